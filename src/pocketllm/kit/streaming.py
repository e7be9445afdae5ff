"""`EventStreamResponse`: a streaming response that stops when its client disconnects, at a lower cost per
open stream than Starlette's `StreamingResponse`."""

from __future__ import annotations

import asyncio

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class EventStreamResponse(StreamingResponse):
    """Send the body iterator's chunks until it ends or the client disconnects, whichever comes first.

    Starlette's `StreamingResponse` watches for the disconnect in an anyio task group, with a second task,
    a cancel scope and their wrappers. Here one plain task waits for the `http.disconnect` message and
    cancels the sending task, which measured about 6 KiB less per open stream under uvicorn
    (benchmarks/open_streams.py). As in Starlette, a disconnect ends the response quietly: the body
    iterator is closed and `__call__` returns normally. A cancellation from elsewhere, such as a server
    shutdown, still propagates.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        sender = asyncio.current_task()
        assert sender is not None, "an ASGI app always runs in a task"
        client_left = False
        sending = True

        def on_disconnect(watcher: asyncio.Task[None]) -> None:
            nonlocal client_left
            if watcher.cancelled() or watcher.exception() is not None or not sending:
                return
            client_left = True
            sender.cancel()

        watcher = asyncio.create_task(_wait_for_disconnect(receive))
        watcher.add_done_callback(on_disconnect)
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            # uncancel() takes back only our own request, so a shutdown's cancellation still propagates.
            if not client_left or sender.uncancel() > 0:
                raise
        finally:
            sending = False
            watcher.cancel()
        if self.background is not None:
            await self.background()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
