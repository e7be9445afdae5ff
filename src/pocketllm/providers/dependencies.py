"""Process-wide provider machinery, created by the app's lifespan and reached through the request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from pocketllm.kit.cache import JsonCache
from pocketllm.kit.crypto import SecretBox
from pocketllm.providers.catalogue import Catalogue
from pocketllm.providers.guard import HostClients
from pocketllm.providers.http import ProviderHttp


@dataclass(slots=True)
class ProviderRuntime:
    http_client: HostClients
    http: ProviderHttp
    catalogue: Catalogue
    cache: JsonCache
    secrets: SecretBox

    async def close_idle_connections(self) -> int:
        """Close idle keep-alive connections to providers and return how many were closed."""
        return await self.http_client.close_idle_connections()

    async def close(self) -> None:
        await self.http_client.aclose()
        await self.cache.close()


async def get_provider_runtime(request: Request) -> ProviderRuntime:
    runtime: ProviderRuntime = request.app.state.providers
    return runtime


Providers = Annotated[ProviderRuntime, Depends(get_provider_runtime)]
