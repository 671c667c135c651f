"""Batch rendering that loses nothing.

A jobs file (JSONL: one request object a line; or CSV with a header of field names)
is rendered into an output folder. `manifest.jsonl` in that folder records each
job's state. Running the same command again after a crash, Ctrl-C or SIGKILL renders
exactly the jobs that are not done, never rewrites a finished file (outputs are
written atomically and never replaced), and leaves no half-written PNG. A bad line
is reported with its line number and the other jobs still run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .outputs import remove_stale_temp_files, safe_output_path
from .requests import IMAGE_FIELDS, BaseRequest, StudioInputError, parse_request

MANIFEST_NAME = "manifest.jsonl"


@dataclass
class Job:
    line: int  # 1-based line number in the jobs file (CSV: the row's line)
    job_id: str  # line number + hash of the line's content: stable across reruns
    request: BaseRequest | None = None  # None when the line is bad
    error: str | None = None  # why the line is bad


@dataclass
class BatchSummary:
    rendered: list[str] = field(default_factory=list)  # job ids rendered by this run
    skipped: list[str] = field(default_factory=list)  # job ids already done by an earlier run
    failed: dict[int, str] = field(default_factory=dict)  # line number -> error
    files: list[Path] = field(default_factory=list)  # every output of this run


def read_jobs(jobs_path: Path, max_jobs: int) -> list[Job]:
    """Parse a JSONL or CSV jobs file; bad lines become jobs with an error, not an exception."""
    jobs_path = Path(jobs_path)
    try:
        text = jobs_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StudioInputError(f"jobs file {str(jobs_path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise StudioInputError(f"jobs file {str(jobs_path)!r} cannot be read: {error}") from None
    rows = _csv_rows(text) if jobs_path.suffix.lower() == ".csv" else _jsonl_rows(text)
    if len(rows) > max_jobs:
        raise StudioInputError(f"jobs file {str(jobs_path)!r} has {len(rows)} jobs, more than the limit of {max_jobs}")
    jobs = []
    for line, raw, data in rows:
        job_id = f"{line:05d}-{hashlib.sha256(raw.encode()).hexdigest()[:8]}"
        job = Job(line, job_id)
        try:
            if isinstance(data, Exception):
                raise StudioInputError(str(data))
            job.request = parse_request(_resolve_image_paths(data, jobs_path.parent.resolve()))
        except StudioInputError as error:
            job.error = str(error)
        jobs.append(job)
    return jobs


def _jsonl_rows(text: str) -> list[tuple[int, str, object]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            rows.append((number, line, json.loads(line)))
        except json.JSONDecodeError as error:
            rows.append((number, line, ValueError(f"not valid JSON: {error.msg} at column {error.colno}")))
    return rows


def _csv_rows(text: str) -> list[tuple[int, str, object]]:
    """CSV with a header of request field names; cells that parse as JSON numbers/bools/lists are typed."""
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    for row in reader:
        data = {}
        for key, value in row.items():
            if key is None or value is None or value == "":
                continue  # extra unnamed cells or empty cells: field not set
            try:
                parsed = json.loads(value)
                data[key.strip()] = parsed if not isinstance(parsed, str) else value
            except json.JSONDecodeError:
                data[key.strip()] = value
        rows.append((reader.line_num, json.dumps(row, sort_keys=True), data))
    return rows


def _resolve_image_paths(data, base: Path):
    """Image paths are relative to the jobs file's folder and may not leave it."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for name in IMAGE_FIELDS:
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or "\x00" in value:
            raise StudioInputError(f"{name} must be a path relative to the jobs file, got {value!r}")
        path = (base / value).resolve()
        if os.path.isabs(value) or base not in path.parents:
            raise StudioInputError(f"{name} {value!r} is outside the jobs file's folder")
        data[name] = str(path)
    return data


def _read_manifest(path: Path) -> dict[str, dict]:
    """Job id -> last recorded entry. A torn last line (killed while appending) is ignored."""
    entries: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                entries[entry["job"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return entries


def _append_manifest(path: Path, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def run_batch(studio, jobs_path: Path, out_dir: Path, progress_factory=None, on_job=None) -> BatchSummary:
    """Render every job not already done into out_dir. `on_job(job, status, detail)` reports each job."""
    from .progress import Progress

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        remove_stale_temp_files(folder)
    jobs = read_jobs(jobs_path, studio.settings.max_batch_lines)
    manifest_path = out_dir / MANIFEST_NAME
    manifest = _read_manifest(manifest_path)
    summary = BatchSummary()
    report = on_job or (lambda job, status, detail: None)

    for job in jobs:
        if job.error is not None:
            summary.failed[job.line] = job.error
            report(job, "failed", job.error)
            continue
        done = manifest.get(job.job_id, {})
        if done.get("state") == "done" and all((out_dir / name).is_file() for name in done.get("files", [])):
            summary.skipped.append(job.job_id)
            report(job, "skipped", "already done")
            continue
        request = job.request
        if request.seed is None:
            # A seed from the job's identity: a rerun after a kill makes the same images.
            request = request.model_copy(update={"seed": int(job.job_id[-8:], 16)})
        try:
            if request.output is not None:
                target = safe_output_path(out_dir, request.output)
            else:
                target = out_dir / f"{job.job_id}.png"
            result = studio.run(request, progress_factory() if progress_factory else Progress())
            paths = result.save(target, overwrite=False)
        except (StudioInputError, RuntimeError, ValueError) as error:
            summary.failed[job.line] = str(error)
            _append_manifest(manifest_path, {"job": job.job_id, "line": job.line, "state": "failed", "error": str(error)})
            report(job, "failed", str(error))
            continue
        relative = [str(path.resolve().relative_to(out_dir.resolve())) for path in paths]
        _append_manifest(manifest_path, {"job": job.job_id, "line": job.line, "state": "done", "files": relative})
        summary.rendered.append(job.job_id)
        summary.files.extend(paths)
        report(job, "done", ", ".join(relative))
    return summary
