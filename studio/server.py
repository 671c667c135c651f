"""Serving the web UI safely: command-line options, exposure rules, a request guard, launch settings.

The UI itself (tabs, events) is `studio/ui/`; this module decides *how* it is served:

- it binds 127.0.0.1 unless told otherwise, and refuses to listen on another address or open a
  share link without a password (`--auth user:pass`), unless `--insecure-no-auth` says so;
- uploads have a size limit per request, and the queue is bounded;
- `RequestGuard` refuses what gradio would otherwise allow: a Host header naming another site
  (DNS rebinding), file inputs that are server paths rather than uploads, fetching URLs,
  serving any file but the copies gradio made of what the studio handed out, and
  state-changing requests from another site (a cross-origin POST).

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

from . import flags
from .requests import StudioInputError
from .settings import JOB_TIME_LIMIT_HELP, Settings, positive_seconds

DEFAULT_MAX_UPLOAD = "50mb"
DEFAULT_QUEUE_SIZE = 16
# JSON bodies of API calls are small (files travel through /upload); larger bodies are refused.
MAX_JSON_BODY = 16 * 1024 * 1024
# The HTTP API (/sdapi/v1, /studio/v1) carries images as base64 in JSON: 4/3 of the upload limit, plus the rest.
_API_ROUTE = re.compile(r"^/(?:sdapi/v1|studio/v1)(?:/|$)")
_API_BODY_EXTRA = 1024 * 1024


def api_body_limit(max_upload: int | None) -> int:
    """Largest JSON body of an API request: the upload limit once base64-encoded, plus 1 MiB for the rest."""
    if max_upload is None:
        return MAX_JSON_BODY
    return max(MAX_JSON_BODY, -(-max_upload * 4 // 3) + _API_BODY_EXTRA)

# -- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="The studio's web UI and API (gradio). Serves 127.0.0.1 only unless told otherwise.",
        allow_abbrev=False,
    )
    model = flags.add_settings_arguments(parser)
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
        "--allowed-hosts",
        default="",
        help="host names the server answers to besides localhost and IP addresses, comma-separated "
        "(e.g. studio.lan,*.example.com); requests naming other hosts are refused (DNS rebinding)",
    )
    serving.add_argument(
        "--max-upload",
        default=DEFAULT_MAX_UPLOAD,
        help=f"largest upload request, all its files together (default {DEFAULT_MAX_UPLOAD})",
    )
    serving.add_argument(
        "--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, help=f"jobs that may wait (default {DEFAULT_QUEUE_SIZE})"
    )
    serving.add_argument("--job-time-limit", type=positive_seconds, metavar="SECONDS", help=JOB_TIME_LIMIT_HELP)

    api = parser.add_argument_group("HTTP API (AUTOMATIC1111's /sdapi/v1 and the studio's /studio/v1)")
    api.add_argument("--api", action="store_true", help="serve the HTTP API beside the UI (same queue and device)")
    api.add_argument("--api-only", action="store_true", help="serve the HTTP API without the UI")
    api.add_argument(
        "--api-auth",
        default=None,
        help="user:password for the API (HTTP Basic; comma-separate several); also STUDIO_API_AUTH. "
        "Without it the API takes --auth's passwords; off localhost one of them is required",
    )
    api.add_argument(
        "--cors-allow-origins",
        default="",
        help="origins whose web pages may call the API (e.g. http://localhost:3000), comma-separated; "
        "default none",
    )
    return parser


def settings_from_args(args: argparse.Namespace, environ: dict | None = None) -> Settings:
    """Settings from STUDIO_* variables, then the command line; the bind address from --host/--listen."""
    return flags.settings_from_args(
        args,
        environ,
        outputs_dir=args.outputs,
        host=args.host or ("0.0.0.0" if args.listen else None),
        port=args.port,
        job_time_limit=args.job_time_limit,
        lora_paths=False,  # clients name LoRAs in the server's models folders; a path would probe its disk
    )


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


def check_api_exposure(host: str, share: bool, api_auth, auth, insecure_no_auth: bool) -> None:
    """The API's exposure rule: beyond this machine it needs --api-auth or --auth (HTTP Basic)."""
    exposed = share or not is_loopback(host)
    if exposed and not api_auth and not auth and not insecure_no_auth:
        where = "a public share link" if share else f"{host} (reachable from other machines)"
        raise StudioInputError(
            f"refusing to serve the HTTP API on {where} without a password: add --api-auth user:password "
            "(or --auth; or --insecure-no-auth if you really mean it)"
        )


def parse_origins(text: str | None) -> tuple[str, ...]:
    """`--cors-allow-origins a,b` as a tuple of origins (scheme://host[:port]); a path or bad scheme is refused."""
    origins = []
    for item in (text or "").split(","):
        item = item.strip().rstrip("/")
        if not item:
            continue
        parts = urlsplit(item)
        if item != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path):
            raise StudioInputError(f"--cors-allow-origins {item!r} should look like http://localhost:3000")
        origins.append(item)
    return tuple(origins)


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
_UPLOAD_ROUTE = re.compile(r"^(?:/gradio_api)?/upload/?$")
# Gradio routes the studio does not use; each would read or fetch something on a caller's behalf.
_CLOSED_ROUTES = re.compile(
    r"^(?:/gradio_api)?/(?:proxy=|process_recording|vibe-|undo-vibe-edit|monitoring|dev/|run-history|runs)"
)
_SCHEME = re.compile(r"^\s*[a-zA-Z][a-zA-Z0-9+.-]*:|^\s*[\\/]{2}")
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
# Multipart framing around the files of one upload request (boundaries, part headers).
_UPLOAD_FRAMING = 64 * 1024
# Served files are data, never pages: no sniffing them into HTML, no scripts if a browser opens one.
_SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff")]
_FILE_HEADERS = [(b"content-security-policy", b"default-src 'none'; sandbox")]


def _is_url(text: str) -> bool:
    """A URL or scheme-relative URL (`http://x`, `//x`, `file:...`); Windows drive letters are not URLs."""
    return bool(_SCHEME.match(text)) and not re.match(r"^\s*[a-zA-Z]:[\\/]", text)


def _file_inputs(value) -> list[dict]:
    """Every dict in a JSON body that names a file (`{"path": ...}`): gradio reads those as file inputs."""
    found = []
    if isinstance(value, dict):
        if "path" in value:
            found.append(value)
        for item in value.values():
            found.extend(_file_inputs(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(_file_inputs(item))
    return found


def _file_input_problem(item: dict) -> str | None:
    """Why a file input may not be used, or None. Gradio checks that a file was uploaded only when
    the input carries `meta: {_type: gradio.FileData}`; without it, any server path would be read."""
    meta = item.get("meta")
    path = item.get("path")
    if not (isinstance(meta, dict) and meta.get("_type") == "gradio.FileData"):
        return "file inputs must be files uploaded to this server (POST /gradio_api/upload), sent as gradio FileData"
    if isinstance(path, str) and _is_url(path) and not path.startswith("data:"):
        return f"the studio does not fetch URLs; upload the file instead of {_shorten(path)!r}"
    return None


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def host_allowed(host_header: str, allowed_hosts: tuple[str, ...]) -> bool:
    """Is the Host header one this server answers to? IP addresses always are (a page served from an
    address is that address's own origin); names only when listed (`*.example.com` and `*` allowed).
    A name resolving to this machine that is not listed is DNS rebinding: some other site's page."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:7860
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if not host:
        return False
    if _is_ip(host):
        return True
    host = host.rstrip(".")
    for pattern in allowed_hosts:
        pattern = pattern.lower().rstrip(".")
        if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


def default_allowed_hosts(bind_host: str, share: bool = False, extra=()) -> tuple[str, ...]:
    """localhost, the bind address's name, this machine's names when listening on every address,
    gradio.live for a share link, and what the user listed (`--allowed-hosts`)."""
    hosts = ["localhost", *extra]
    if bind_host and not _is_ip(bind_host):
        hosts.append(bind_host)
    if bind_host in ("0.0.0.0", "::"):
        hosts += [socket.gethostname(), socket.getfqdn()]
    if share:
        hosts.append("*.gradio.live")
    return tuple(dict.fromkeys(host for host in hosts if host))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _inside(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root


def is_inside(path: str, folder: str) -> bool:
    """Is path (symlinks resolved) inside folder?"""
    return _inside(os.path.realpath(path), os.path.realpath(folder))


def served_file_allowed(target: str, file_root: str) -> bool:
    """/file= serves only gradio's cache: the copies of the files this server handed out (results,
    uploads). Not the outputs folder, not dotfiles, not symlinks leading out, never a URL."""
    if not target or _is_url(target) or "\x00" in target:
        return False
    path, root = os.path.realpath(target), os.path.realpath(file_root)
    if not _inside(path, root) or not os.path.isfile(path):
        return False
    return not any(part.startswith(".") for part in Path(path).relative_to(root).parts)


class RequestGuard:
    """ASGI middleware in front of gradio's routes (see the module docstring).

    allowed_hosts: names the Host header may carry (IP addresses always may);
    max_upload: bytes one upload request may carry, all its files together;
    file_root: the folder /file= may serve (None: gradio's upload/cache folder).
    """

    def __init__(
        self,
        app,
        allowed_hosts=("localhost",),
        max_upload: int | None = None,
        file_root: str | None = None,
        cors_allow_origins=(),
    ):
        self.app = app
        self.allowed_hosts = tuple(allowed_hosts)
        self.max_upload = max_upload
        self.file_root = file_root
        # Origins whose pages may call the HTTP API (--cors-allow-origins); no other origin may, not even GET.
        self.cors_allow_origins = {origin.rstrip("/").lower() for origin in cors_allow_origins}

    def _file_root(self) -> str:
        if self.file_root is None:
            from gradio.utils import get_upload_folder

            return get_upload_folder()
        return self.file_root

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        method = scope.get("method", "GET").upper()
        path = scope.get("path", "")
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}

        # 1. DNS rebinding: a page of another site whose name now resolves to this machine.
        host = headers.get("host", "")
        if not host_allowed(host, self.allowed_hosts):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            message = f"host {_shorten(host)!r} is not one this server answers to (see --allowed-hosts)"
            return await _refuse(send, 403, message)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        # 2. Routes the studio does not use, and /file= beyond the files this server handed out.
        if _CLOSED_ROUTES.match(path):
            return await _refuse(send, 404, "not found")
        file_match = _FILE_ROUTE.match(path)
        if file_match and not served_file_allowed(unquote(file_match.group("target")), self._file_root()):
            return await _refuse(send, 403, "this server serves only the files it made or was sent")
        send = _with_headers(send, _SECURITY_HEADERS + (_FILE_HEADERS if file_match else []))

        # 3. A state-changing request from another site (a page in the user's browser posting here).
        #    The HTTP API answers other sites not at all (reads included) unless --cors-allow-origins lists them.
        origin = headers.get("origin")
        api = bool(_API_ROUTE.match(path))
        foreign = origin is not None and not _same_origin(origin, host)
        if api and foreign:
            if "*" not in self.cors_allow_origins and origin.rstrip("/").lower() not in self.cors_allow_origins:
                return await _refuse(send, 403, f"cross-origin request from {_shorten(origin)!r} refused")
        elif method not in _SAFE_METHODS and foreign:
            return await _refuse(send, 403, f"cross-origin request from {_shorten(origin)!r} refused")
        if method != "POST":
            return await self.app(scope, receive, send)

        # 4a. The HTTP API: JSON with base64 images, capped at the upload limit once encoded; never paths.
        if api:
            limit = api_body_limit(self.max_upload)
            declared = headers.get("content-length", "")
            message = f"request body larger than this server's limit of {limit} bytes (--max-upload, base64-encoded)"
            if declared.isdigit() and int(declared) > limit:
                return await _refuse(send, 413, message)
            body, too_large = await _read_body(receive, limit)
            if too_large:
                return await _refuse(send, 413, message)
            return await self.app(scope, _replay(body), send)

        # 4. Uploads: the limit holds for all the files of one request together.
        if _UPLOAD_ROUTE.match(path):
            limit = None if self.max_upload is None else self.max_upload + _UPLOAD_FRAMING
            declared = headers.get("content-length", "")
            if limit is not None and declared.isdigit() and int(declared) > limit:
                return await _refuse(send, 413, f"upload larger than this server's limit of {self.max_upload} bytes")
            body, too_large = await _read_body(receive, limit)
            if too_large:
                return await _refuse(send, 413, f"upload larger than this server's limit of {self.max_upload} bytes")
            return await self.app(scope, _replay(body), send)

        # 5. JSON bodies: file inputs must be uploads (not server paths, not URLs).
        if headers.get("content-type", "").split(";")[0].strip().lower() in _FORM_TYPES:
            return await self.app(scope, receive, send)
        body, too_large = await _read_body(receive, MAX_JSON_BODY)
        if too_large:
            return await _refuse(send, 413, "request body too large; upload files through /gradio_api/upload")
        if body.strip():
            try:
                data = json.loads(body)
            except (ValueError, RecursionError):  # ValueError covers bad JSON, bad UTF-8, huge integers
                return await _refuse(send, 400, "the request body is not valid JSON")
            for item in _file_inputs(data):
                problem = _file_input_problem(item)
                if problem:
                    return await _refuse(send, 400, problem)
        return await self.app(scope, _replay(body), send)


def _same_origin(origin: str, host: str) -> bool:
    parts = urlsplit(origin)
    return bool(parts.netloc) and parts.netloc.lower() == host.lower()


def _with_headers(send, extra: list[tuple[bytes, bytes]]):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", [])}
            message = {**message, "headers": [*message.get("headers", []), *(h for h in extra if h[0] not in names)]}
        await send(message)

    return wrapped


async def _read_body(receive, limit: int | None) -> tuple[bytes, bool]:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
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
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *_SECURITY_HEADERS,
            ],
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
    allowed_hosts=(),
    quiet: bool = False,
    routes=None,
    cors_allow_origins=(),
) -> dict:
    """Everything `Blocks.launch` needs to serve the studio safely; `routes` (the HTTP API's mounts)
    come before gradio's own."""
    from starlette.middleware import Middleware

    outputs = Path(settings.outputs_dir).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    guard = Middleware(
        RequestGuard,
        allowed_hosts=default_allowed_hosts(settings.host, share, allowed_hosts),
        max_upload=parse_size(max_upload),
        cors_allow_origins=tuple(cors_allow_origins),
    )
    app_kwargs = {"middleware": [guard], "docs_url": None, "redoc_url": None}
    if routes:
        app_kwargs["routes"] = list(routes)
    return {
        "server_name": settings.host,
        "server_port": settings.port,
        "auth": auth,
        "share": share,
        # Results are copied from here into gradio's cache, the only folder /file= serves (RequestGuard).
        "allowed_paths": [str(outputs)],
        "max_file_size": max_upload,
        "app_kwargs": app_kwargs,
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
