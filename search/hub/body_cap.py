"""The hub's request body cap: ASGI middleware that reads at most so many bytes of a body before
routing, authentication or parsing look at it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
from fastapi.responses import JSONResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# A refused body is still read to its end and thrown away, up to DRAIN_BYTES past the cap and
# DRAIN_SECONDS, before the 413 goes out. Closing a socket with unread bytes makes the kernel
# answer with a reset, which can overtake the 413 on the wire and leave the client with
# "connection reset" instead of the reason (seen in CI on a loaded machine). Past either bound the
# hub stops reading, so that no client makes it read megabytes or wait on a trickle; such a
# client may see the reset.
DRAIN_BYTES = 1 << 20
DRAIN_SECONDS = 2.0


class BodyCap:
    """ASGI middleware: read at most ``limit`` bytes of any request body (``batch_limit`` for a
    path ending in ``/batch-result``), before routing, authentication or parsing; answer 413 past
    it. The body is then replayed to the app."""

    def __init__(self, app: ASGIApp, limit: int, batch_limit: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.batch_limit = limit if batch_limit is None else batch_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.batch_limit if str(scope.get("path", "")).endswith("/batch-result") else self.limit
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            if declared.isdigit() and int(declared) <= limit + DRAIN_BYTES:
                await _drain(receive, 0, limit + DRAIN_BYTES)
            await self._refuse(send, limit)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                if message.get("more_body", False):
                    await _drain(receive, size, limit + DRAIN_BYTES)
                await self._refuse(send, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # the client's disconnect, if it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, limit: int) -> None:
        response = JSONResponse({"error": "PayloadTooLarge", "detail": f"request body over {limit} bytes"},
                                status_code=413, headers={"Connection": "close"})
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


async def _drain(receive: Receive, read: int, most: int) -> None:
    """Read and discard the rest of a refused body (``read`` bytes of it are already read) until
    it ends, more than ``most`` bytes in all are read, or DRAIN_SECONDS pass."""
    with anyio.move_on_after(DRAIN_SECONDS):
        while read <= most:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
