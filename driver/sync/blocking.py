"""The sync functions for code that holds a blocking :class:`~charforge.driver.client.ComfyClient` (the
recipes, the CLI): ``call(client, upload_folder, folder, "pip")`` runs ``upload_folder(client's asyncio
client, folder, "pip")`` on the client's own event loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..client import ComfyClient
from ..client.async_client import AsyncComfyClient
from ._http import path, request_json

T = TypeVar("T")


def call(client: ComfyClient, function: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    return client._run(function(client._async, *args, **kwargs))


async def server_info(client: AsyncComfyClient) -> dict[str, Any]:
    """The server's folders (``upload_dir``, ``outputs_dir``, ...) and transfer limits."""
    _, answer = await request_json(client, "GET", path("info"))
    return answer
