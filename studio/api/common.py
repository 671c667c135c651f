"""What both API families share: base64 images in and out, error answers, HTTP Basic auth, CORS."""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import secrets

from studio.images import open_image
from studio.requests import StudioInputError

log = logging.getLogger(__name__)

_DATA_URL = re.compile(r"^data:[\w/+.-]*(?:;[\w=.-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
API_PATHS = re.compile(r"^/(?:sdapi/v1|studio/v1)(?:/|$)")


def decode_base64(value, name: str) -> bytes:
    """The bytes of a base64 string (with or without a `data:image/png;base64,` prefix).

    Anything else is refused, a file path or URL included: the API never reads a server file."""
    if not isinstance(value, str) or not value.strip():
        raise StudioInputError(f"{name} must be a base64-encoded image (file paths and URLs are not accepted)")
    text = _WHITESPACE.sub("", _DATA_URL.sub("", value.strip(), count=1))
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise StudioInputError(f"{name} is not valid base64 (file paths and URLs are not accepted)") from None


def decode_image(value, name: str, max_pixels: int, keep_alpha: bool = True):
    """A PIL image from a base64 string, checked like an upload (header first: bombs refused)."""
    return open_image(decode_base64(value, name), max_pixels=max_pixels, name=name, keep_alpha=keep_alpha)


def encode_png(data_or_image) -> str:
    if not isinstance(data_or_image, bytes):
        buffer = io.BytesIO()
        data_or_image.save(buffer, format="PNG")
        data_or_image = buffer.getvalue()
    return base64.b64encode(data_or_image).decode("ascii")


def error_response(status: int, error: str, detail: str, **extra):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=status)


def field_of(message: str) -> str:
    """The field a StudioInputError message starts with (`steps: ...`, `init_images[0] is ...`)."""
    match = re.match(r"[\w.\[\]]+", message)
    return match.group(0) if match else ""


def first_line(error: Exception) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


# -- HTTP Basic -----------------------------------------------------------------------------------


def basic_auth_dependency(credentials):
    """A FastAPI dependency requiring HTTP Basic with one of `credentials` [(user, password)]; None: open."""
    if not credentials:
        return None
    pairs = [(user.encode(), password.encode()) for user, password in credentials]

    def require_basic_auth(request):
        from fastapi import HTTPException

        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                user, sep, password = base64.b64decode(value.strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                user, sep, password = b"", b"", b""
            if sep:
                ok = False
                for known_user, known_password in pairs:  # compare with every pair: no timing hint
                    ok |= secrets.compare_digest(user, known_user) & secrets.compare_digest(password, known_password)
                if ok:
                    return
        raise HTTPException(status_code=401, detail="authentication required", headers={"WWW-Authenticate": "Basic"})

    from fastapi import Request

    require_basic_auth.__annotations__ = {"request": Request}
    return require_basic_auth


# -- CORS for the API routes ---------------------------------------------------------------------


class ApiCors:
    """ASGI wrapper, outermost: the CORS policy of the API routes (other paths pass untouched).

    No cross-origin access unless --cors-allow-origins names the origin: preflights from other
    origins are refused, and any Access-Control-* header set further in (gradio's own CORS
    middleware echoes any origin when the server is reached by a non-localhost address) is removed.
    RequestGuard, further in, refuses the requests themselves from origins not listed.
    """

    def __init__(self, app, allow_origins=()):
        self.app = app
        self.allow_origins = {origin.rstrip("/").lower() for origin in allow_origins if origin}

    def allowed(self, origin: str) -> bool:
        return "*" in self.allow_origins or origin.rstrip("/").lower() in self.allow_origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not API_PATHS.match(scope.get("path", "")):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        allowed = origin is not None and self.allowed(origin)
        if scope.get("method") == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
            status = 204 if allowed else 403
            extra = []
            if allowed:
                extra = [
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                    (b"access-control-allow-headers", b"authorization, content-type"),
                    (b"access-control-max-age", b"600"),
                    (b"vary", b"Origin"),
                ]
            await send({"type": "http.response.start", "status": status, "headers": extra})
            return await send({"type": "http.response.body", "body": b""})

        async def wrapped(message):
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
                if allowed:
                    kept += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
                message = {**message, "headers": kept}
            await send(message)

        return await self.app(scope, receive, wrapped)


async def run_job(work, rename=lambda message: message):
    """Run `work` (sync, maybe long) in a thread; studio errors become JSON answers (422 naming the field,
    503 queue full, 504 timed out, 500 a failed render). `rename`: field names as the client knows them."""
    from starlette.concurrency import run_in_threadpool

    from studio.progress import JobTimedOut

    from .jobs import QueueFull

    try:
        return await run_in_threadpool(work)
    except StudioInputError as error:
        message = rename(str(error))
        return error_response(422, "StudioInputError", message, field=field_of(message))
    except QueueFull as error:
        return error_response(503, "queue full", str(error))
    except JobTimedOut as error:
        return error_response(504, "JobTimedOut", first_line(error))
    except (RuntimeError, ValueError, OSError) as error:
        log.warning("API render failed: %s", first_line(error))
        return error_response(500, type(error).__name__, first_line(error))
