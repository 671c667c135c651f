"""The Batch tab: a JSONL/CSV jobs file (and the images it names) rendered by `studio.batch.run_batch`."""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import gradio as gr

from studio.progress import GenerationCancelled

from .runner import SessionProgress, StudioUI, add_history, friendly, session_key
from .widgets import uploaded_files


class BatchTab:
    """What build_app needs of the Batch tab: its run event, Cancel button and status."""

    run_event = None
    cancel_button = None
    status = None


def build_batch_tab(ui: StudioUI, history: gr.State) -> BatchTab:
    tab = BatchTab()
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            gr.Markdown(
                "Upload a **jobs file**: JSONL, one request a line "
                '(`{"prompt": "a blue square", "seed": 3}`), or CSV with a header of request fields. '
                "Editing jobs name their images by file name: upload those images too. "
                "Bad lines are reported by number and the other jobs still run."
            )
            jobs = uploaded_files(gr.File(
                label="jobs (.jsonl or .csv)",
                file_types=[".jsonl", ".csv", ".json", ".txt"],
                type="filepath",
                height=150,
                elem_id="batch-jobs",
            ))
            images = uploaded_files(gr.File(
                label="images the jobs name (optional)",
                file_count="multiple",
                file_types=["image"],
                type="filepath",
                height=150,
                elem_id="batch-images",
            ))
            with gr.Row():
                run_button = gr.Button("Run batch", variant="primary", scale=3, elem_id="batch-run")
                tab.cancel_button = gr.Button("Cancel", variant="stop", scale=1, elem_id="batch-cancel")
        with gr.Column(scale=4):
            gallery = gr.Gallery(
                label="results",
                columns=4,
                height=320,
                format="png",
                type="filepath",
                interactive=False,
                buttons=["download", "fullscreen"],
            )
            archive = gr.File(label="all results: PNGs and manifest.jsonl as a .zip", interactive=False, height=90)
            tab.status = gr.Markdown("", label="status", elem_classes="studio-status")
            log_box = gr.Textbox(label="log", lines=6, max_lines=16, interactive=False)

    def batch(jobs, images, history, request: gr.Request, progress=gr.Progress()):
        """Render a JSONL/CSV jobs file (and the images it names).

        Returns the PNGs, a .zip of them with manifest.jsonl, a status line and the per-line log."""
        return _run_batch(ui, jobs, images, history, request, progress)

    tab.run_event = run_button.click(
        batch,
        [jobs, images, history],
        [gallery, archive, tab.status, log_box, history],
        api_name="batch",
        concurrency_id="device",
        concurrency_limit=1,
    )
    return tab


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _run_batch(ui: StudioUI, jobs, images, history, request, progress):
    from studio.batch import read_jobs, run_batch

    if not jobs:
        raise gr.Error("Upload a jobs file (.jsonl or .csv) first.", title="Check the input", print_exception=False)
    work = Path(tempfile.mkdtemp(prefix="studio-batch-"))  # private: never served
    out_dir = ui.outputs / "batches" / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    jobs_path = work / ("jobs.csv" if str(jobs).lower().endswith(".csv") else "jobs.jsonl")
    session = session_key(request)
    cancel = threading.Event()
    lines: list[str] = []  # the batch's report of each line (run_batch's on_job), shown as the log
    counter = {"job": 0, "failed": 0}
    cancelled = False
    try:
        shutil.copyfile(jobs, jobs_path)
        for image in images or []:
            # Uploaded names reduced to a plain file name inside the private folder.
            name = _SAFE_NAME.sub("_", Path(image).name).lstrip(".") or "image"
            shutil.copyfile(image, work / name)
        total = len(read_jobs(jobs_path, ui.settings.max_batch_lines))  # for the progress bar only

        def progress_factory():
            if cancel.is_set():
                raise GenerationCancelled("cancelled by the user")
            counter["job"] += 1
            label = f"job {counter['job']}/{total}"
            progress((counter["job"] - 1, total), desc=label, unit="jobs")

            def on_update(stage, step, steps, preview=None):
                progress((step, steps), desc=f"{label} · {stage.replace('_', ' ')}", unit="steps")

            return SessionProgress(on_update, cancel)

        def on_job(job, status, detail):  # also on a cancel, where run_batch returns no summary
            lines.append(f"line {job.line}: {status}: {detail}")
            counter["failed"] += status == "failed"

        ui.jobs[session] = cancel
        with ui.device_lock:
            # A line may name only the models this server lists, and images uploaded with the batch.
            run_batch(ui.studio, jobs_path, out_dir, progress_factory, on_job, allowed_models=ui.offered_models())
    except GenerationCancelled:
        cancelled = True
        lines.append("cancelled: the finished files are kept")
    except Exception as error:
        raise friendly(error) from None
    finally:
        ui.jobs.pop(session, None)
        shutil.rmtree(work, ignore_errors=True)

    files = sorted(out_dir.rglob("*.png")) if out_dir.exists() else []
    archive = None
    if out_dir.exists():
        archive = out_dir.with_suffix(".zip")
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as bundle:
            for path in sorted(out_dir.rglob("*")):
                if path.is_file() and not path.name.startswith("."):
                    bundle.write(path, path.relative_to(out_dir).as_posix())
    status = f"{len(files)} image{'s' if len(files) != 1 else ''} in `{out_dir.name}`"
    failed = counter["failed"]
    if failed:
        status += f"; {failed} line{'s' if failed != 1 else ''} failed (see the log)"
    if cancelled:
        status = "Cancelled. " + status
    return (
        [(str(p), p.name) for p in files],
        str(archive) if archive else None,
        status,
        "\n".join(lines),
        add_history([(str(p), f"batch · {p.stem}") for p in files], history),
    )
