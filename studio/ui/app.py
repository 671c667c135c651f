"""The whole app: `build_app` puts the tabs together, `launch` serves it, `main` is `python app.py`."""

from __future__ import annotations

import logging
import os
import sys

import gradio as gr

from studio import server
from studio.requests import StudioInputError
from studio.settings import Settings

from .batch_tab import build_batch_tab
from .models_tab import build_models_tab
from .png_info_tab import build_png_info_tab
from .runner import StudioUI, session_key
from .task_tab import TaskTab, build_task_tab, wire_send_to
from .widgets import NO_PROGRESS

# Gradio's upload cache (uploads, and copies of the results it served) is swept hourly of files older
# than a day; inputs the studio stored in outputs/inputs/ are kept longer (runner.INPUT_MAX_AGE).
UPLOAD_CACHE_SWEEP = (3600, 24 * 3600)

CSS = """
.gradio-container { width: 100% !important; max-width: 1320px !important; margin: 0 auto !important; }
#studio-header h1 { margin: 0 0 2px 0; }
#studio-header p { margin: 0; opacity: 0.75; }
.studio-status p { margin: 4px 0; }
.studio-status { min-height: 2.5em; }
/* Results, history and input images shown alike: fitted to their box, small ones (64x64) scaled up
   pixel for pixel, never blurred. */
.studio-images img, .studio-image img { image-rendering: pixelated; object-fit: contain; }
.studio-image img { width: 100%; height: 100%; }
.studio-send-to { gap: 4px !important; }
.studio-send-to button { flex: 1 1 0; }
"""


def build_app(studio, settings: Settings, *, queue_size: int = server.DEFAULT_QUEUE_SIZE) -> gr.Blocks:
    """The whole UI as a gr.Blocks with its queue configured; serve it with `launch(demo, settings, ...)`.

    Nothing here loads a model or picks a device: `studio` does that on the first request. With `studio`
    None, the UI makes its Studio on first use (torch and diffusers are imported then, not here).
    """
    from studio.tasks import default_registry

    ui = StudioUI(studio, settings, tasks=None if studio is not None else default_registry())
    task_tabs: dict[str, TaskTab] = {}
    with gr.Blocks(title="Studio", analytics_enabled=False, delete_cache=UPLOAD_CACHE_SWEEP) as demo:
        history = gr.State([])  # this session's images, newest first: [(path, caption)]
        history_gallery = gr.Gallery(
            label="history",
            show_label=False,
            columns=6,
            height=220,
            format="png",
            type="filepath",
            object_fit="contain",
            fit_columns=False,
            interactive=False,
            buttons=["download", "fullscreen"],
            elem_id="history",
            elem_classes="studio-images",
            render=False,
        )
        gr.Markdown(
            "# Studio\nText to image and image editing on this machine. Every PNG keeps its settings: "
            "drop one on **PNG info** to see or reuse them.",
            elem_id="studio-header",
        )
        model_state = gr.Markdown(elem_id="studio-model-state", elem_classes="studio-status")
        model_state_timer = gr.Timer(1.0, active=False)

        def show_model_state():
            """While the default model loads behind the page: say so, and look again in a second."""
            if ui.preloading:
                return "⏳ Loading the model in the background; a run started now waits for it.", gr.Timer(active=True)
            return "", gr.Timer(active=False)

        for trigger in (demo.load, model_state_timer.tick):
            outputs = [model_state, model_state_timer]
            trigger(show_model_state, None, outputs, queue=False, api_visibility="private", **NO_PROGRESS)
        with gr.Tabs() as tabs:
            for spec in ui.tasks:
                with gr.Tab(spec.title, id=spec.name):
                    task_tabs[spec.name] = TaskTab(spec)
                    build_task_tab(ui, task_tabs[spec.name], history)
            with gr.Tab("Batch", id="batch"):
                batch_tab = build_batch_tab(ui, history)
            with gr.Tab("PNG info", id="png_info"):
                build_png_info_tab(ui, tabs, task_tabs)
            with gr.Tab("Models and settings", id="models") as models_tab:
                model_applied = build_models_tab(ui, models_tab)
        wire_send_to(ui, tabs, task_tabs)
        follow_the_model(ui, demo, task_tabs, model_applied)
        with gr.Accordion("History: the newest images of the outputs folder", open=True):
            history_gallery.render()
        # A reloaded page (or a new tab) starts from the outputs folder, newest first.
        show_history = {"fn": lambda h: h, "inputs": history, "outputs": history_gallery, "queue": False}
        demo.load(ui.recent_outputs, None, history, queue=False, api_visibility="private", **NO_PROGRESS).then(
            **show_history, api_visibility="private", **NO_PROGRESS
        )

        run_tabs = [*task_tabs.values(), batch_tab]
        run_events = [tab.run_event for tab in run_tabs]
        run_events += [event for tab in task_tabs.values() for event in tab.extra_events]
        for event in run_events:
            event.then(**show_history, api_visibility="private", **NO_PROGRESS)

        def cancel(request: gr.Request) -> str:
            """Cancel this client's running job after its current step (finished images are kept)."""
            if ui.cancel(session_key(request)):
                return "Cancelling after the current step…"
            return "Nothing is running in this session."

        # The API's cancel first, so that it is the one named /cancel.
        gr.Button(visible=False).click(cancel, None, gr.Textbox(visible=False), queue=False, api_name="cancel")
        for tab in run_tabs:
            # Stops this session's running job after its current step; the job then answers as usual
            # ("Cancelled.", or a batch's finished files). Not gradio's `cancels=`: that would detach the
            # page from the running job, so a batch's finished files would never be shown.
            tab.cancel_button.click(
                cancel,
                None,
                tab.status,
                queue=False,
                api_visibility="private",
                api_name=f"cancel_{getattr(tab, 'task', 'batch')}",
            )

    demo.studio_ui = ui  # for main() (preload) and tests
    demo.studio_queue_size = queue_size  # the HTTP API's bounded wait (launch(api=True))
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo


def follow_the_model(ui: StudioUI, demo: gr.Blocks, task_tabs: dict[str, TaskTab], model_applied) -> None:
    """The task tabs show the current model's recommended settings: after a swap in the models tab, and on a
    page (re)loaded after one (the page's widgets start at the model the app was built with). A value the user
    set is kept."""
    from studio.recommended import recommendations_for_reference

    shown_model = gr.State(ui.settings.model)  # the model whose recommendations this page's widgets show
    widgets = [tab.inputs[name] for tab in task_tabs.values() for name in tab.recommendable()]

    def follow(shown, *values):
        current = ui.settings.model
        if current == shown:
            return [gr.skip()] * (1 + len(widgets))
        old, new = recommendations_for_reference(shown), recommendations_for_reference(current)
        updates, start = [current], 0
        for tab in task_tabs.values():
            count = len(tab.recommendable())
            updates += tab.follow_model(old.for_task(tab.task), new.for_task(tab.task), values[start : start + count])
            start += count
        return updates

    options = {"inputs": [shown_model, *widgets], "outputs": [shown_model, *widgets], "queue": False}
    options |= NO_PROGRESS
    demo.load(follow, **options, api_visibility="private")
    model_applied.success(follow, **options, api_visibility="private")


def launch(
    demo: gr.Blocks,
    settings: Settings,
    *,
    block: bool = True,
    auth=None,
    share: bool = False,
    max_upload=server.DEFAULT_MAX_UPLOAD,
    allowed_hosts=(),
    quiet: bool = False,
    api: bool = False,
    api_auth=None,
    cors_allow_origins=(),
):
    """Serve the app as `main()` does (tests call this with block=False and a free port).

    api: also serve the HTTP API (/sdapi/v1, /studio/v1) on the same Studio and device lock; it takes
    HTTP Basic with `api_auth`'s passwords, else `auth`'s (gradio's login does not cover these routes)."""
    routes = None
    if api:
        from studio.api import api_routes

        queue_size = getattr(demo, "studio_queue_size", server.DEFAULT_QUEUE_SIZE)
        routes = api_routes(demo.studio_ui, queue_size=queue_size, credentials=api_auth or auth)
    options = server.launch_kwargs(
        settings,
        auth=auth,
        share=share,
        max_upload=max_upload,
        allowed_hosts=allowed_hosts,
        quiet=quiet,
        routes=routes,
        cors_allow_origins=cors_allow_origins,
    )
    launched = demo.launch(prevent_thread_lock=True if api else not block, css=CSS, **options)
    if api:
        from studio.api import ApiCors

        # Outermost, around gradio's own CORS middleware: the API's CORS policy is --cors-allow-origins only.
        app = demo.server_app
        app.middleware_stack = ApiCors(app.middleware_stack or app.build_middleware_stack(), cors_allow_origins)
        if block:
            demo.block_thread()
    return launched


def main(argv: list[str] | None = None) -> int:
    """`python app.py`: check the flags (2 on a bad one), serve, preload the model, block until interrupted."""
    args = server.build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("studio").setLevel(logging.INFO)  # model loading, preload time
    try:
        settings = server.settings_from_args(args)
        auth = server.parse_auth(args.auth or os.environ.get("STUDIO_AUTH"))
        api_auth = server.parse_auth(args.api_auth or os.environ.get("STUDIO_API_AUTH"))
        cors_allow_origins = server.parse_origins(args.cors_allow_origins)
        if not args.api_only:
            server.check_exposure(settings.host, args.share, auth, args.insecure_no_auth)
        if args.api or args.api_only:
            server.check_api_exposure(settings.host, args.share, api_auth, auth, args.insecure_no_auth)
        server.parse_size(args.max_upload)
    except StudioInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.api_only:
        return serve_api_only(args, settings, api_auth or auth, cors_allow_origins)

    server.environ_for_offline()  # before diffusers/transformers are imported: they read it then
    imported = server.process_age()
    # The page is served first; torch, diffusers and the model load behind it (preload), and the page
    # says so until they are ready.
    demo = build_app(None, settings, queue_size=args.queue_size)
    allowed_hosts = [host.strip() for host in args.allowed_hosts.split(",") if host.strip()]
    _, local_url, _ = launch(
        demo,
        settings,
        block=False,
        auth=auth,
        share=args.share,
        max_upload=args.max_upload,
        allowed_hosts=allowed_hosts,
        api=args.api,
        api_auth=api_auth,
        cors_allow_origins=cors_allow_origins,
    )
    server.wait_until_ready(local_url)
    ready = server.process_age()
    print(
        f"ready at {local_url}: {ready:.1f} s after the process started "
        f"({imported:.1f} s to import gradio, {ready - imported:.1f} s to build and serve)",
        flush=True,
    )
    if not args.no_preload:
        demo.studio_ui.start_preload()
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


def serve_api_only(args, settings: Settings, credentials, cors_allow_origins) -> int:
    """`python app.py --api-only`: the HTTP API alone on uvicorn, behind RequestGuard, same exposure rules."""
    import uvicorn

    server.environ_for_offline()
    from studio.api import api_only_app
    from studio.core import Studio

    ui = StudioUI(Studio(settings), settings)
    allowed_hosts = [host.strip() for host in args.allowed_hosts.split(",") if host.strip()]
    app = api_only_app(
        ui,
        queue_size=args.queue_size,
        credentials=credentials,
        allowed_hosts=server.default_allowed_hosts(settings.host, False, allowed_hosts),
        max_upload=server.parse_size(args.max_upload),
        cors_allow_origins=cors_allow_origins,
    )
    if not args.no_preload:
        ui.start_preload()
    print(f"HTTP API at http://{settings.host}:{settings.port}/sdapi/v1 (docs: /studio/v1/docs)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    return 0
