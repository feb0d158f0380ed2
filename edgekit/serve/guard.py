"""The daemon's front door: Host, Origin, API key, content type and body size as route dependencies; per-request metrics.

The checks run before any route reads the body: a 10 MB body with a Content-Length over the cap is
refused (413) without reading it; a chunked body is counted as it streams in (``read_body``). The
Host check refuses DNS-rebinding requests to a loopback daemon (Ollama CVE-2024-28224); the key is
compared in constant time (``hmac.compare_digest``); ``/health`` stays open for probes. A web page
can send simple requests to a loopback daemon (a ``text/plain`` POST needs no preflight): requests
with an ``Origin`` not in ``allowed_origins`` get 403 and API bodies must be ``application/json``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from pathlib import Path

from starlette.requests import ClientDisconnect, Request

from edgekit.errors import ConfigError
from edgekit.serve.errors import ApiError
from edgekit.serve.settings import ServeSettings

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# Endpoint label values of the metrics (anything else is "other", so paths cannot blow up label cardinality).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/classify", "/v1/models", "/health", "/metrics")


def read_api_key(settings: ServeSettings) -> str | None:
    """The API key from --api-key-file; refuses an empty file and a non-loopback bind without a key."""
    key = None
    if settings.api_key_file is not None:
        path = Path(settings.api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--api-key-file {path}: cannot read: {exc}") from exc
        if len(key) < 16:
            raise ConfigError(f"--api-key-file {path}: the key is {len(key)} characters; use at least 16",
                              hint="e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))' > key`")
    if key is None and not settings.loopback:
        raise ConfigError(
            f"refusing to listen on {settings.host} without an API key: anyone on the network could use the models",
            hint="pass --api-key-file FILE (clients send 'Authorization: Bearer KEY'), or bind to 127.0.0.1",
        )
    return key


def host_name(value: str) -> str:
    """Host header without the port ('[::1]:8080' -> '::1', 'localhost:8080' -> 'localhost').

    Anything after a bracketed address but a port ('[::1].evil.com') keeps the whole value, which no
    allowed name equals.
    """
    value = value.strip().lower()
    if value.startswith("["):
        address, _, rest = value[1:].partition("]")
        return address if rest == "" or (rest.startswith(":") and rest[1:].isdigit()) else value
    if value.count(":") == 1:
        name, port = value.split(":")
        return name if port.isdigit() else value
    return value


class Guard:
    """The checks every API route depends on: Host (loopback binds), API key, declared body size."""

    def __init__(self, settings: ServeSettings, api_key: str | None) -> None:
        self.settings = settings
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.allowed_hosts = {h.lower() for h in (*LOOPBACK_NAMES, settings.host, *settings.allowed_hosts)}
        self.allowed_origins = {o.lower().rstrip("/") for o in settings.allowed_origins}

    def check_host(self, request: Request) -> None:
        """403 for a Host header a loopback daemon does not answer to (DNS rebinding)."""
        value = request.headers.get("host")
        if self.settings.loopback and value is not None:
            host = host_name(value)
            if host not in self.allowed_hosts:
                raise ApiError(403, f"Host {host!r} is not allowed on this loopback daemon (DNS rebinding protection)",
                               code="host_not_allowed")

    def check_origin(self, request: Request) -> None:
        """403 for a request a web page sent (it carries an Origin) unless that origin is allowed."""
        origin = request.headers.get("origin")
        if origin is not None and origin.lower() not in self.allowed_origins:
            raise ApiError(403, f"cross-origin requests from {origin!r} are not allowed (allow it with --allowed-origins)",
                           code="origin_not_allowed")

    def check_json(self, request: Request) -> None:
        """415 for a request body that is not declared as JSON (an HTML form or text/plain post from a web page)."""
        if request.method not in ("POST", "PUT", "PATCH"):
            return
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise ApiError(415, f"the request body must be application/json, not {media or 'undeclared'!r}",
                           code="unsupported_media_type")

    def check_key(self, request: Request) -> None:
        """401 without the right 'Authorization: Bearer KEY' when the daemon has a key."""
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "").encode("latin-1")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(token.strip(), self.api_key):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    def check_length(self, request: Request) -> None:
        """413 for a declared body over the cap, before anything reads it."""
        length = request.headers.get("content-length")
        if length is None:
            return
        try:
            declared = int(length)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number", code="invalid_request") from None
        if declared > self.settings.max_body_bytes:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {self.settings.max_body_bytes}",
                           code="request_too_large")


# Route dependencies (FastAPI ``Depends``); the app's Guard is ``app.state.guard``.
def allowed_host(request: Request) -> None:
    request.app.state.guard.check_host(request)


def same_origin(request: Request) -> None:
    request.app.state.guard.check_origin(request)


def json_body(request: Request) -> None:
    request.app.state.guard.check_json(request)


def authenticated(request: Request) -> None:
    request.app.state.guard.check_key(request)


def body_within_limit(request: Request) -> None:
    request.app.state.guard.check_length(request)


class RequestMetrics:
    """ASGI middleware: count every HTTP request by model, endpoint and status, and time it."""

    def __init__(self, app, *, metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        answered = {"yes": False}

        async def send_recording(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                answered["yes"] = True
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        except asyncio.CancelledError:
            if answered["yes"]:
                raise
            # uvicorn cancels what is still running when the shutdown grace period ends (e.g. a client still
            # uploading): answer that request 503 here instead of letting it surface as a 500 and an ERROR traceback.
            await _answer(send_recording, ApiError(503, "the daemon is shutting down", code="shutting_down"))
        finally:
            path = scope["path"]
            endpoint = path if path in ENDPOINTS else "other"
            if endpoint != "/metrics":
                model = scope.get("state", {}).get("model", "")
                self.metrics.requests.labels(model=model, endpoint=endpoint, status=str(status["code"])).inc()
                self.metrics.latency.labels(model=model, endpoint=endpoint).observe(time.perf_counter() - started)


async def _answer(send, error: ApiError) -> None:
    """Send ``error`` as a complete JSON response (the client may be gone; then nothing is sent)."""
    body = json.dumps(error.body()).encode("utf-8")
    try:
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
    except OSError:
        pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it grows past ``limit`` (chunked uploads have no length)."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # the client left mid-upload (or its body timed out): nobody reads an answer
        raise ApiError(499, "the client closed the connection before sending the whole body", code="client_closed") from None
    return b"".join(chunks)
