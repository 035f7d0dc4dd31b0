"""Middlewares for Ray Serve's HTTP proxy, in a module of their own so the proxy starts fast.

Serve's proxy imports the callback named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (`PROXY_CALLBACK`) when it
starts. Importing `serving.reward_service` pulls in torch and transformers (16 s on a busy 2-core machine), longer
than Serve's proxy readiness check waits (3 x 5 s), so the proxy was killed before it ran; this module imports
only starlette and the wire format (`serving.api`), and `tests/test_serving.py` checks that it stays so.
"""

import logging
import uuid

from starlette.middleware import Middleware
from starlette.responses import JSONResponse

from rayrlhf.serving.api import ErrorResponse

log = logging.getLogger(__name__)

MAX_REQUEST_ID = 128
REQUEST_ID_RULE = f"X-Request-ID must be 1-{MAX_REQUEST_ID} printable ASCII characters"


def valid_request_id(value: str | None) -> bool:
    """A client's X-Request-ID is echoed in bodies, headers and logs: 1-128 printable ASCII characters.
    (Starlette decodes header bytes as Latin-1, so a non-ASCII byte shows up here as a non-ASCII character.)"""
    return value is None or (0 < len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable())


class RequestIdGuard:
    """ASGI middleware for Serve's HTTP proxy, outside its own request-id handling (which answers a non-ASCII
    X-Request-ID with a plain-text 500): such a request gets the service's JSON 400 at the proxy instead."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            # Header bytes decoded as Latin-1, as Starlette decodes them for the app's own check.
            given = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"x-request-id"]
            if not all(map(valid_request_id, given)):
                body = ErrorResponse(error="bad_request", request_id=uuid.uuid4().hex, message=REQUEST_ID_RULE)
                await JSONResponse(body.model_dump(exclude_none=True), status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ProxyFailureAs503:
    """ASGI middleware for Serve's HTTP proxy: when the replica holding a request dies, the proxy sends no
    response (the HTTP server then answers a plain-text 500) or a plain-text 500 of Serve's own; either becomes
    a retryable 503 with the service's JSON error and Retry-After. The service's own errors are JSON and pass."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = replaced = False

        async def unavailable(request_id: str) -> None:
            body = ErrorResponse(error="unavailable", request_id=request_id,
                                 message="the reward model replica serving this request failed; retry")
            await JSONResponse(body.model_dump(exclude_none=True), status_code=503,
                               headers={"Retry-After": "1", "X-Request-ID": request_id})(scope, receive, send)

        async def send_or_replace(message) -> None:
            nonlocal started, replaced
            if message["type"] == "http.response.start":
                started = True
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if message["status"] == 500 and not headers.get(b"content-type", b"").startswith(b"application/json"):
                    replaced = True
                    await unavailable(headers.get(b"x-request-id", uuid.uuid4().hex.encode()).decode("ascii", "replace"))
                    return
            if not replaced:
                await send(message)

        try:
            await self.app(scope, receive, send_or_replace)
        except Exception:
            if started:
                raise
            log.exception("the proxy failed a request before it answered")
        if not started:
            given = dict(scope["headers"]).get(b"x-request-id")
            await unavailable(given.decode("ascii", "replace") if given else uuid.uuid4().hex)


PROXY_CALLBACK = "rayrlhf.serving.proxy:proxy_middlewares"


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy reads its middlewares from the callback named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
    (`PROXY_CALLBACK`) in the environment the cluster was started with: `rayrlhf serve` sets it for the local
    Ray it starts, the RayService manifest for its pods."""
    return [Middleware(ProxyFailureAs503), Middleware(RequestIdGuard)]
