"""What the server refuses before a model sees a request: a missing or wrong API key (401; the key compared in
constant time), a body over `max_body_bytes` (413, counted as it streams in, so a lying Content-Length does
not help: the body is read here first), and the JSON error shape every refusal uses. A pure ASGI middleware: it runs before FastAPI reads
the body, and also times every request for the metrics."""

from __future__ import annotations

import hmac
import json
import time

from tunesmith.serving.settings import ServeSettings
from tunesmith.serving.telemetry import Telemetry

OPEN_PATHS = {"/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}


def error_body(status: int, message: str, kind: str, param: str | None = None, **extra) -> dict:
    """OpenAI's error shape (its clients read it): {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status, **extra}}


class _TooLarge(Exception):
    pass


class Guard:
    def __init__(self, app, settings: ServeSettings, telemetry: Telemetry):
        self.app = app
        self.settings = settings
        self.telemetry = telemetry
        self._key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _reply(sending, *refusal)
                return
            await self.app(scope, await self._buffered(receive), sending)
        except _TooLarge:
            await _reply(sending, 413, error_body(
                413, f"the request body is over the server's limit of {self.settings.max_body_bytes} bytes "
                "(--max-body-bytes); send fewer or shorter inputs per request", "request_too_large",
                limit="max_body_bytes", value=self.settings.max_body_bytes))
        finally:
            self.telemetry.observe(_route(scope), status["code"], started)

    def _refusal(self, scope) -> tuple[int, dict, dict] | None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self._key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self._key):
                return 401, error_body(401, "missing or wrong API key: send the header `Authorization: Bearer <key>` with "
                                            "the key the server was started with (--api-key or $TUNESMITH_API_KEY)",
                                       "authentication_error"), {"www-authenticate": "Bearer"}
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.settings.max_body_bytes:
            raise _TooLarge
        return None

    async def _buffered(self, receive):
        """The whole body read here, at most `max_body_bytes` of it (a lying or missing Content-Length does not
        help), then handed to the app as one message."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([], message, receive)
            seen += len(message.get("body", b""))
            if seen > self.settings.max_body_bytes:
                raise _TooLarge
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return _replay(chunks, None, receive)


def _replay(chunks: list[bytes], final, receive):
    """The buffered body as one message, then the real channel (a streamed response waits on it for a disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return final if final is not None else {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await receive()

    return replayed


def _route(scope) -> str:
    """The matched route's template (bounded label values), never the raw path."""
    route = scope.get("route")
    return getattr(route, "path", None) or ("unmatched" if scope.get("type") == "http" else "-")


async def _reply(send, status: int, body: dict, headers: dict | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
