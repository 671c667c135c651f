"""Serving the web UI safely: command-line options, exposure rules, a request guard, launch settings.

The UI itself (tabs, events) is `app.py`; this module decides *how* it is served:

- it binds 127.0.0.1 unless told otherwise, and refuses to listen on another address or open a
  share link without a password (`--auth user:pass`), unless `--insecure-no-auth` says so;
- the server reads files only from the outputs folder and gradio's own upload folder
  (`allowed_paths`), uploads have a size limit, and the queue is bounded;
- `RequestGuard` refuses what gradio would otherwise allow: fetching URLs through `/file=`
  or through a file input (the studio fetches no URLs), and state-changing requests from
  another site (a cross-origin POST).

Nothing here imports gradio or torch at import time, picks a device or reads settings.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import socket
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .requests import StudioInputError
from .settings import Settings

DEFAULT_MAX_UPLOAD = "50mb"
DEFAULT_QUEUE_SIZE = 16
# JSON bodies of API calls are small (files travel through /upload); larger bodies are refused.
MAX_JSON_BODY = 16 * 1024 * 1024

# -- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="The studio's web UI and API (gradio). Serves 127.0.0.1 only unless told otherwise.",
    )
    model = parser.add_argument_group("model and device")
    model.add_argument(
        "--model", help="embedded (default), a diffusers folder, a cached hub id, or a .safetensors file"
    )
    model.add_argument("--models-dir", type=Path, action="append", default=[], help="a folder of models to offer")
    model.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N, mps")
    model.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"])
    model.add_argument("--attention-slicing", action="store_true", default=None, help="lower peak memory, slower")
    model.add_argument("--vae-tiling", action="store_true", default=None, help="decode large images in tiles")
    model.add_argument(
        "--offload", default=None, choices=["none", "model", "sequential"], help="CPU offload (GPU only)"
    )
    model.add_argument("--allow-pickle", action="store_true", default=None, help="allow pickle weights (weights_only)")
    model.add_argument("--no-preload", action="store_true", help="load the model on the first request, not at start")

    serving = parser.add_argument_group("serving")
    serving.add_argument("--outputs", type=Path, default=None, help="folder for the PNGs (default: outputs/)")
    serving.add_argument("--port", type=int, default=None, help="port (default 7860)")
    serving.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serving.add_argument("--listen", action="store_true", help="bind 0.0.0.0 (needs --auth)")
    serving.add_argument("--share", action="store_true", help="open a public gradio.live link (needs --auth)")
    serving.add_argument(
        "--auth",
        default=None,
        help="user:password (comma-separate several); also read from STUDIO_AUTH. Required off localhost",
    )
    serving.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow --listen/--share without a password (anyone who can reach the port can use it and read outputs)",
    )
    serving.add_argument(
        "--max-upload", default=DEFAULT_MAX_UPLOAD, help=f"largest upload (default {DEFAULT_MAX_UPLOAD})"
    )
    serving.add_argument(
        "--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, help=f"jobs that may wait (default {DEFAULT_QUEUE_SIZE})"
    )
    return parser


def settings_from_args(args: argparse.Namespace, environ: dict | None = None) -> Settings:
    """Settings from STUDIO_* variables, then the command line; the bind address from --host/--listen."""
    host = args.host or ("0.0.0.0" if args.listen else None)
    overrides = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "attention_slicing": args.attention_slicing,
        "vae_tiling": args.vae_tiling,
        "offload": args.offload,
        "allow_pickle": args.allow_pickle,
        "outputs_dir": args.outputs,
        "host": host,
        "port": args.port,
    }
    if args.models_dir:
        overrides["models_dirs"] = tuple(args.models_dir)
    return Settings.from_env(environ, **overrides)


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    """`user:pass[,user2:pass2]` to gradio's list of pairs; None when not given."""
    if text is None or not text.strip():
        return None
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise StudioInputError("--auth must look like user:password (several separated by commas)")
        pairs.append((user, password))
    return pairs


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, share: bool, auth, insecure_no_auth: bool) -> None:
    """Refuse to serve beyond this machine without a password, unless explicitly told to."""
    exposed = share or not is_loopback(host)
    if exposed and not auth and not insecure_no_auth:
        where = "a public share link" if share else f"{host} (reachable from other machines)"
        raise StudioInputError(
            f"refusing to serve on {where} without a password: add --auth user:password "
            "(or --insecure-no-auth if you really mean it)"
        )


def parse_size(text: str | int | None) -> int | None:
    """'50mb' -> bytes (the format gradio's max_file_size takes), for messages and checks."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*(b|kb|mb|gb|tb)?\s*", str(text).lower())
    if not match:
        raise StudioInputError(f"--max-upload {text!r} should look like 50mb, 500kb or 1gb")
    factor = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}[match.group(2) or "b"]
    return int(match.group(1)) * factor


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# -- the request guard -----------------------------------------------------------------------------

_FILE_ROUTE = re.compile(r"^(?:/gradio_api)?/file(?:=|/)(?P<target>.*)$", re.S)
_SCHEME = re.compile(r"^\s*[a-zA-Z][a-zA-Z0-9+.-]*:|^\s*[\\/]{2}")
_JSON_ROUTES = re.compile(r"^(?:/gradio_api)?/(?:queue/join|run/|call/|api/)")
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def _is_url(text: str) -> bool:
    """A URL or scheme-relative URL (`http://x`, `//x`, `file:...`); Windows drive letters are not URLs."""
    return bool(_SCHEME.match(text)) and not re.match(r"^\s*[a-zA-Z]:[\\/]", text)


def _file_data_urls(value) -> list[str]:
    """URLs given as the path of file inputs (gradio would download them) anywhere in a JSON body."""
    found = []
    if isinstance(value, dict):
        meta = value.get("meta")
        if isinstance(meta, dict) and meta.get("_type") == "gradio.FileData":
            path = value.get("path")
            if isinstance(path, str) and _is_url(path) and not path.startswith("data:"):
                found.append(path)
        for item in value.values():
            found.extend(_file_data_urls(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(_file_data_urls(item))
    return found


class RequestGuard:
    """ASGI middleware in front of gradio's routes (see the module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method = scope.get("method", "GET").upper()
        path = scope.get("path", "")
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}

        # 1. /file=<url> would make this server fetch the URL for the caller.
        match = _FILE_ROUTE.match(path)
        if match and _is_url(unquote(match.group("target"))):
            return await _refuse(send, 403, "fetching URLs is off: /file= serves only the studio's own files")

        # 2. A state-changing request from another site (a page in the user's browser posting here).
        origin = headers.get("origin")
        if method not in _SAFE_METHODS and origin is not None and not _same_origin(origin, headers.get("host", "")):
            return await _refuse(send, 403, f"cross-origin request from {origin!r} refused")

        # 3. A file input given as a URL: gradio would download it.
        if method == "POST" and _JSON_ROUTES.match(path) and "json" in headers.get("content-type", ""):
            body, too_large = await _read_body(receive, MAX_JSON_BODY)
            if too_large:
                return await _refuse(send, 413, "request body too large; upload files through /upload")
            try:
                urls = _file_data_urls(json.loads(body or b"null"))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                urls = []  # gradio answers malformed bodies itself
            if urls:
                return await _refuse(
                    send, 400, f"the studio does not fetch URLs; upload the file instead of {urls[0]!r}"
                )
            return await self.app(scope, _replay(body), send)
        return await self.app(scope, receive, send)


def _same_origin(origin: str, host: str) -> bool:
    parts = urlsplit(origin)
    return bool(parts.netloc) and parts.netloc.lower() == host.lower()


async def _read_body(receive, limit: int) -> tuple[bytes, bool]:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks), False


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _refuse(send, status: int, message: str) -> None:
    payload = json.dumps({"detail": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


# -- launching ---------------------------------------------------------------------------------------


def launch_kwargs(
    settings: Settings,
    *,
    auth=None,
    share: bool = False,
    max_upload: str | int | None = DEFAULT_MAX_UPLOAD,
    quiet: bool = False,
) -> dict:
    """Everything `Blocks.launch` needs to serve the studio safely."""
    from starlette.middleware import Middleware

    outputs = Path(settings.outputs_dir).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    return {
        "server_name": settings.host,
        "server_port": settings.port,
        "auth": auth,
        "share": share,
        # The server reads files only from here (and gradio's own upload folder).
        "allowed_paths": [str(outputs)],
        "max_file_size": max_upload,
        "app_kwargs": {"middleware": [Middleware(RequestGuard)], "docs_url": None, "redoc_url": None},
        "show_error": False,  # unexpected errors reach the browser as one line, never a stack trace
        "enable_monitoring": False,
        "mcp_server": False,
        "ssr_mode": False,
        "pwa": False,
        "run_history": False,
        "strict_cors": True,
        "footer_links": ["api"],
        "quiet": quiet,
    }


def wait_until_ready(url: str, timeout: float = 30.0) -> float:
    """Poll the page until it answers; returns the seconds waited."""
    import urllib.request

    started = time.perf_counter()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own local server
                if response.status == 200:
                    return time.perf_counter() - started
        except OSError:
            pass
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.05)


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere since this module was imported)."""
    try:
        with open("/proc/self/stat") as stat:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            return float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def environ_for_offline(environ: dict | None = None) -> None:
    """No telemetry, no hub lookups: the studio is offline-first."""
    env = os.environ if environ is None else environ
    env.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Loading bars and library chatter are not for the UI's console (the CLI quiets them the same way).
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("DIFFUSERS_VERBOSITY", "error")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
