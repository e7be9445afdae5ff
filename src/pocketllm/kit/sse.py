"""An incremental Server-Sent Events parser that follows "Interpreting an event stream" in the WHATWG HTML
Living Standard (https://html.spec.whatwg.org/multipage/server-sent-events.html).

`SseDecoder` is fed text or UTF-8 bytes in chunks of any size and returns the events completed so far.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

# A line ends in CRLF, LF or CR. The alternatives are tried in order, so CRLF is one line break.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BYTE_ORDER_MARK = "\ufeff"
# Far above the size of a chat stream event (usually well under 1 KB), so it only stops unbounded growth.
DEFAULT_MAX_EVENT_CHARS = 4 * 1024 * 1024


class SseEventTooLarge(ValueError):
    """A line or an event's data grew beyond the decoder's `max_event_chars`."""


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event: its data lines joined by "\\n", its type, and the last event ID seen."""

    data: str
    event: str = "message"
    id: str | None = None


class SseDecoder:
    """Incremental event stream decoder: `feed` text chunks, then call `end` when the stream ends.

    `max_event_chars` bounds the memory one event can take, so a server that never ends a line or an
    event cannot grow the buffers without limit. `feed` raises SseEventTooLarge when a line or an event's
    data exceeds it.
    """

    def __init__(self, *, max_event_chars: int = DEFAULT_MAX_EVENT_CHARS) -> None:
        self.max_event_chars = max_event_chars
        # The reconnection time in milliseconds from the last valid `retry` field, or None.
        self.retry_ms: int | None = None
        # The event that was still open when `end` was called, which the standard says to discard.
        self.unterminated_event: SseEvent | None = None
        self.ended = False
        self._ended_cleanly = False

        self._at_stream_start = True
        self._skip_line_feed = False
        self._line_parts: list[str] = []
        self._line_length = 0
        self._data_lines: list[str] = []
        self._data_length = 0
        self._event_type = ""
        self._last_event_id: str | None = None
        # True once a field line of the current event was read, so `end` can tell an open event from a gap.
        self._event_open = False
        # The UTF-8 decoder of `feed_bytes`, created at its first call.
        self._utf8: codecs.BufferedIncrementalDecoder | None = None

    @property
    def ended_cleanly(self) -> bool:
        """Whether the stream ended at an event boundary, after an empty line or before any field.

        False before `end` is called, and when the stream ended inside a line or inside an event.
        """
        return self._ended_cleanly

    def feed(self, text: str) -> list[SseEvent]:
        """Parse the next chunk of the stream and return the events it completed, in order."""
        if self.ended:
            raise RuntimeError("SseDecoder.feed() was called after end()")
        if not text:
            return []

        # A CR that ended the previous chunk already ended a line, so an LF right after it belongs to it.
        if self._skip_line_feed and text.startswith("\n"):
            text = text[1:]
        self._skip_line_feed = text.endswith("\r")
        if self._at_stream_start and text:
            self._at_stream_start = False
            text = text.removeprefix(_BYTE_ORDER_MARK)

        events: list[SseEvent] = []
        start = 0
        for line_break in _LINE_BREAK.finditer(text):
            self._append_to_line(text[start : line_break.start()])
            line = "".join(self._line_parts)
            self._line_parts.clear()
            self._line_length = 0
            event = self._process_line(line)
            if event is not None:
                events.append(event)
            start = line_break.end()
        self._append_to_line(text[start:])
        return events

    def feed_bytes(self, data: bytes) -> list[SseEvent]:
        """Decode the next chunk as UTF-8, which event streams always use, and `feed` the text.

        Invalid bytes become U+FFFD, and a character split between two chunks is decoded whole.
        """
        if self._utf8 is None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return self.feed(self._utf8.decode(data))

    def end(self) -> SseEvent | None:
        """Mark the end of the stream and return the unterminated event, if any.

        The standard discards an event that the stream ends inside of, and `feed` never returns one. This
        returns it anyway, with an unterminated last line read as a whole line, so a caller can decide. It
        is also kept in `unterminated_event`.
        """
        if self.ended:
            return self.unterminated_event
        if self._utf8 is not None:
            # Bytes of an unfinished character become U+FFFD. They hold no line break, so no event ends here.
            self.feed(self._utf8.decode(b"", final=True))
        self.ended = True

        ended_inside_line = bool(self._line_parts)
        if ended_inside_line:
            line = "".join(self._line_parts)
            self._line_parts.clear()
            self._line_length = 0
            self._process_line(line)
        if self._data_lines:
            self.unterminated_event = self._build_event()
        self._ended_cleanly = not ended_inside_line and not self._event_open
        return self.unterminated_event

    def _append_to_line(self, part: str) -> None:
        if not part:
            return
        self._line_length += len(part)
        if self._line_length > self.max_event_chars:
            raise SseEventTooLarge(f"An event stream line is longer than {self.max_event_chars} characters.")
        self._line_parts.append(part)

    def _process_line(self, line: str) -> SseEvent | None:
        """Apply one complete line, and return the event that an empty line dispatches."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None

        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        self._process_field(name, value)
        return None

    def _process_field(self, name: str, value: str) -> None:
        if name == "data":
            self._data_length += len(value) + 1
            if self._data_length > self.max_event_chars:
                raise SseEventTooLarge(f"An event's data is longer than {self.max_event_chars} characters.")
            self._data_lines.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            # An id containing NULL is ignored, so that it cannot be used to reset the ID by accident.
            if "\0" not in value:
                self._last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry_ms = int(value)
        else:
            # Other field names are ignored, and do not open an event.
            return
        self._event_open = True

    def _dispatch(self) -> SseEvent | None:
        """Finish the current event at an empty line. An event without data lines is dropped."""
        event = self._build_event() if self._data_lines else None
        self._data_lines.clear()
        self._data_length = 0
        self._event_type = ""
        self._event_open = False
        return event

    def _build_event(self) -> SseEvent:
        return SseEvent(data="\n".join(self._data_lines), event=self._event_type or "message", id=self._last_event_id)
