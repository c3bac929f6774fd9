"""The checks an HTTP request passes before its body is read: an ASGI middleware of the ingress.

In order, each answered at once with a JSON `{"detail": ...}` that names the rule (never an input
value):
  401  the bearer token is missing or wrong (when an API key is set; `public_paths` are exempt)
  415  a request with a body that is not declared `application/json`
  413  a body larger than `max_body_bytes` (by its Content-Length, or while it streams in)
Only then is the body read (at most `max_body_bytes`) and handed to the app, which parses it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class RequestGuard:
    """ASGI middleware (`FastAPI.add_middleware(RequestGuard, api_key=..., ...)`)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int,
                 public_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self._api_key = api_key.encode() if api_key else None
        self._max_body_bytes = max_body_bytes
        self._public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value for name, value in scope["headers"]}
        if self._api_key and _route_path(scope) not in self._public_paths and not self._authorized(headers):
            await _answer(send, 401, "authorization: missing or wrong bearer token",
                          [(b"www-authenticate", b"Bearer")])
            return
        if scope["method"] in BODY_METHODS:
            receive = await self._checked_body(headers, receive, send)
            if receive is None:
                return
        await self.app(scope, receive, send)

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        scheme, _, token = headers.get("authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self._api_key)

    async def _checked_body(self, headers: dict[str, bytes], receive: Receive, send: Send) -> Receive | None:
        """A receive that replays the whole (bounded) body, or None once the request was answered."""
        media_type = headers.get("content-type", b"").split(b";")[0].strip().lower()
        if media_type != b"application/json" and not media_type.endswith(b"+json"):
            await _answer(send, 415, "content-type: must be application/json (e.g. curl -H "
                          "'Content-Type: application/json' -d '{...}')")
            return None
        too_large = f"body: larger than the limit; accepted: at most {self._max_body_bytes} bytes"
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self._max_body_bytes):
            await _answer(send, 413, too_large)
            return None
        body = await _read_body(receive, self._max_body_bytes)
        if body is None:
            await _answer(send, 413, too_large)
            return None
        return _replay(body, receive)


def _route_path(scope: Scope) -> str:
    """The path inside the app: Serve sets root_path to the app's route prefix."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None as soon as it exceeds `limit` bytes (or the client left)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # http.disconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()  # after the body: the disconnect, when it comes
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _answer(send: Send, status: int, detail: str,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
