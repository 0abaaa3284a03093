"""Server-sent events and client disconnects.

A client that goes away must stop its request at once, whether it was
reading a stream, waiting for a non-streamed answer, or still queued with no
token yet. Both helpers below watch the connection for ``http.disconnect``
while the work runs, and cancel the work when it comes; cancelling closes the
engine's ``generate`` iterator, which aborts the request and frees its KV
blocks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TypeVar

import anyio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
DONE_EVENT = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


def sse_event(payload: BaseModel | dict) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response that always listens for a disconnect (whatever
    ASGI spec version the server speaks), always closes its body iterator, and runs
    ``on_close`` callbacks however it ends."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None] | None = None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with aclosing(self.body_iterator):  # type: ignore[type-var]
                async with anyio.create_task_group() as group:

                    async def stream_then_stop() -> None:
                        await self.stream_response(send)
                        group.cancel_scope.cancel()

                    group.start_soon(stream_then_stop)
                    await self.listen_for_disconnect(receive)
                    group.cancel_scope.cancel()
        finally:
            if self._on_close is not None:
                self._on_close()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read already, so the next message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
