"""Pure ASGI middleware that runs before any body is parsed: API key and body size.

Order, outermost first: CORS (when enabled, so that preflights and refusals
carry CORS headers) -> API key (an unauthenticated body is never read) ->
body size limit -> the app.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenloom.entrypoints.openai.errors import AUTHENTICATION, INVALID_REQUEST, error_json_bytes


async def send_error(send: Send, status: int, message: str, type: str = INVALID_REQUEST,
                     code: str | None = None, headers: dict[str, str] | None = None) -> None:
    body = error_json_bytes(message, type, None, code)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k == name), None)


class APIKeyMiddleware:
    """``Authorization: Bearer <key>`` on every /v1 route, compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        # Digests have equal lengths, so the comparison does not even leak the key's length.
        self._expected = hashlib.sha256(f"Bearer {api_key}".encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = _header(scope, b"authorization")
            if given is None:
                await send_error(send, 401, "Missing API key: send it as 'Authorization: Bearer <key>'.",
                                 AUTHENTICATION, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                return
            if not hmac.compare_digest(hashlib.sha256(given).digest(), self._expected):
                await send_error(send, 401, "Incorrect API key provided.", AUTHENTICATION, "invalid_api_key",
                                 {"WWW-Authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Refuses a request body over ``max_bytes`` with a 413, whether its Content-Length says
    so up front or it turns out longer while being read (chunked uploads). The body is
    read here and replayed to the app, so the app never holds more than the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        status, body = await self._read_body(receive)
        if status == "too_large":
            await self._refuse(send)
            return
        if status == "disconnected":  # nobody is left to answer
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> tuple[str, bytes]:
        """("complete", body), ("too_large", b"") or ("disconnected", b"")."""
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return "disconnected", b""
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return "too_large", b""
            chunks.append(chunk)
            if not message.get("more_body", False):
                return "complete", b"".join(chunks)

    async def _refuse(self, send: Send) -> None:
        await send_error(send, 413, f"Request body is larger than the limit of {self.max_bytes} bytes.",
                         code="request_too_large")
