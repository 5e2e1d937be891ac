"""Request bodies within bounds, before any parsing: an ASGI middleware.

A body larger than ``SKIPDIT_MAX_BODY_BYTES`` gets 413: at once when Content-Length says so,
else as soon as the bytes read pass the limit (chunked uploads). A body that has not fully
arrived ``SKIPDIT_BODY_TIMEOUT_S`` after the request began gets 408 and the connection is
closed, so a client that opens a request and trickles (or never sends) its body cannot hold a
connection and a parser open. The body is read whole (it is at most the limit) and replayed
to the app; requests without a body (GET, DELETE, HEAD) pass straight through.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    """The client disconnected before its body was complete: nobody to answer."""


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, receive, send, 413, int(length))
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except _TooLarge:
            await self._reject(scope, receive, send, 413, None)
            return
        except TimeoutError:
            await self._reject(scope, receive, send, 408, None)
            return
        except _Gone:
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Gone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _reject(
        self, scope: Scope, receive: Receive, send: Send, status: int, length: int | None
    ) -> None:
        if status == 413:
            got = f"{length} bytes" if length is not None else "more"
            message = f"request body too large: at most {self.max_bytes} bytes, got {got}"
            code = "payload_too_large"
        else:
            message = f"request body did not arrive within {self.timeout_s:g}s"
            code = "body_timeout"
        response = error_response(status, code, message, "body", {"Connection": "close"})
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the buffered body once, then the connection's messages
    (its disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
