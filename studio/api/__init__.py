"""The HTTP API: AUTOMATIC1111's /sdapi/v1 and the studio's /studio/v1, over the UI's Studio and device lock.

    mounts = api_routes(ui, queue_size=16, credentials=[("user", "pass")])

gives Starlette mounts for /sdapi/v1 and /studio/v1 (each with its OpenAPI docs at .../docs); `studio.ui`
puts them first among gradio's routes (`python app.py --api`), and `api_only_app` serves them alone
(`python app.py --api-only`), both behind `studio.server.RequestGuard` and `ApiCors`.
"""

from __future__ import annotations

from .common import ApiCors, basic_auth_dependency
from .jobs import JobGate, QueueFull


def api_routes(ui, *, queue_size: int, credentials=None, gate: JobGate | None = None) -> list:
    """Mounts for /sdapi/v1 and /studio/v1 sharing one JobGate over `ui` (a StudioUI)."""
    from fastapi import Depends
    from starlette.routing import Mount

    from .a1111 import build_a1111_app
    from .studio_v1 import build_studio_app

    gate = gate or JobGate(ui, queue_size)
    check = basic_auth_dependency(credentials)
    dependencies = [Depends(check)] if check else []
    a1111 = build_a1111_app(ui, gate, dependencies)
    own = build_studio_app(ui, gate, dependencies)
    a1111.state.gate = own.state.gate = gate
    return [Mount("/sdapi/v1", app=a1111), Mount("/studio/v1", app=own)]


def api_only_app(ui, *, queue_size: int, credentials=None, allowed_hosts=("localhost",), max_upload=None,
                 cors_allow_origins=(), gate: JobGate | None = None):
    """The API alone, as `python app.py --api-only` serves it: RequestGuard in front, ApiCors outermost."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import RedirectResponse
    from starlette.routing import Route

    from studio.server import RequestGuard

    async def root(request):
        return RedirectResponse("/studio/v1/docs")

    routes = [Route("/", root), *api_routes(ui, queue_size=queue_size, credentials=credentials, gate=gate)]
    guard = Middleware(
        RequestGuard,
        allowed_hosts=allowed_hosts,
        max_upload=max_upload,
        file_root="/nonexistent",
        cors_allow_origins=tuple(cors_allow_origins),
    )
    app = Starlette(routes=routes, middleware=[guard])
    return ApiCors(app, cors_allow_origins)


__all__ = ["ApiCors", "JobGate", "QueueFull", "api_only_app", "api_routes"]
