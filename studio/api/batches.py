"""Batches over HTTP: POST /studio/v1/batch submits jobs, GET /studio/v1/batch/{id} says how far they are.

A batch is a folder under `<outputs>/api-batches/<id>/`: its `jobs.jsonl` (input images, sent as base64,
saved beside it as files the lines name), and `out/` with the PNGs and `manifest.jsonl`, exactly as
`studio batch` makes them (studio.batch). So a batch resumes from its manifest, after a server restart
too: asking for its state starts it again when jobs are left and nothing is running it. Each job takes
the device lock on its own, so UI and API jobs keep being served between a batch's jobs.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from pathlib import Path

from studio.batch import MANIFEST_NAME, read_jobs, read_manifest, run_batch
from studio.requests import StudioInputError

from .common import decode_base64

BATCH_ID = re.compile(r"^[0-9a-f]{12}$")


class _LockedStudio:
    """The UI's Studio as run_batch sees it, taking the device lock for each job (not the whole batch)."""

    def __init__(self, ui):
        self.ui = ui
        self.settings = ui.settings
        self.tasks = ui.tasks

    def run(self, request, progress):
        with self.ui.device_lock:
            return self.ui.studio.run(request, progress)


class Batches:
    """The batches of one server, by id; runs each in a background thread."""

    def __init__(self, ui):
        self.ui = ui
        self.root = Path(ui.outputs) / "api-batches"
        self.running: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def submit(self, jobs) -> dict:
        """Write a batch of request objects (images as base64) to its folder and start it."""
        if not isinstance(jobs, list) or not jobs:
            raise StudioInputError("jobs must be a non-empty list of studio requests")
        if len(jobs) > self.ui.settings.max_batch_lines:
            raise StudioInputError(f"{len(jobs)} jobs is more than the limit of {self.ui.settings.max_batch_lines}")
        batch_id = secrets.token_hex(6)
        folder = self.root / batch_id
        folder.mkdir(parents=True)
        lines = [self._line(entry, number, folder) for number, entry in enumerate(jobs, start=1)]
        (folder / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        self._start(batch_id)
        return self.state(batch_id)

    def _line(self, entry, number: int, folder: Path):
        """A job as a jobs-file line: base64 images become files beside it (bad ones refuse the batch)."""
        if not isinstance(entry, dict):
            return entry  # not a request: run_batch records this line's failure
        line = dict(entry)
        spec = self.ui.tasks.tasks.get(line.get("task", "text_to_image"))
        for name in spec.image_fields if spec else ():
            if line.get(name) is not None:
                image = folder / f"job{number}-{name}.png"
                image.write_bytes(decode_base64(line[name], f"jobs[{number - 1}].{name}"))
                line[name] = image.name
        return line

    def _start(self, batch_id: str) -> None:
        with self._lock:
            if batch_id in self.running and self.running[batch_id].is_alive():
                return
            folder = self.root / batch_id
            thread = threading.Thread(target=self._run, args=(folder,), name=f"batch-{batch_id}", daemon=True)
            self.running[batch_id] = thread
            thread.start()

    def _run(self, folder: Path) -> None:
        run_batch(
            _LockedStudio(self.ui), folder / "jobs.jsonl", folder / "out", allowed_models=self.ui.offered_models()
        )

    def state(self, batch_id: str) -> dict:
        """Jobs done, failed and left, the output files; a batch with jobs left and no runner starts again."""
        folder = self.root / batch_id
        if not BATCH_ID.match(batch_id) or not (folder / "jobs.jsonl").is_file():
            raise KeyError(batch_id)
        total = len(read_jobs(folder / "jobs.jsonl", self.ui.settings.max_batch_lines))
        entries = read_manifest(folder / "out" / MANIFEST_NAME)
        done = [entry for entry in entries.values() if entry.get("state") == "done"]
        failed = {entry["line"]: entry.get("error", "") for entry in entries.values() if entry.get("state") == "failed"}
        left = total - len(done) - len(failed)
        running = batch_id in self.running and self.running[batch_id].is_alive()
        if left > 0 and not running:
            self._start(batch_id)  # after a restart (or a crash of its thread): resume from the manifest
            running = True
        return {
            "id": batch_id,
            "state": "running" if running and left > 0 else "done",
            "jobs": total,
            "done": len(done),
            "failed": failed,
            "left": left,
            "outputs": sorted(name for entry in done for name in entry.get("files", [])),
        }
