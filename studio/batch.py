"""Batch rendering that loses nothing.

A jobs file (JSONL: one request object a line; or CSV with a header of field names)
is rendered into an output folder. `manifest.jsonl` in that folder records each
job's state. Running the same command again after a crash, Ctrl-C or SIGKILL renders
exactly the jobs that are not done, never rewrites a finished file (outputs are
written atomically and never replaced), and leaves no half-written PNG.

A bad line, whatever is wrong with it and whatever it makes fail (parsing, the model,
the inputs, the disk), is recorded with its line number and a one-line reason, and the
other jobs still run. Only Ctrl-C and a cancel stop a batch. A job is reported done
only when each of its files is on disk and was written for it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .core import output_names
from .metadata import read_record, request_to_json
from .outputs import atomic_write_new, clean_output_name, remove_stale_temp_files, safe_output_path
from .progress import GenerationCancelled, JobTimedOut, Progress
from .requests import BaseRequest, StudioInputError, parse_request, seeds_for

MANIFEST_NAME = "manifest.jsonl"
MAX_REASON_CHARS = 300  # a failure's reason is one line of at most this many characters


@dataclass
class Job:
    line: int  # 1-based line number in the jobs file (CSV: the row's line)
    job_id: str  # line number + hash of the line's content: stable across reruns
    request: BaseRequest | None = None  # None when the line is bad
    error: str | None = None  # why the line is bad
    # Image paths as resolved -> as the line wrote them, so that messages quote the line and never
    # the server's folders (in the web UI the jobs file sits in a server temp folder).
    written: dict[str, str] = field(default_factory=dict)


@dataclass
class BatchSummary:
    rendered: list[str] = field(default_factory=list)  # job ids rendered by this run
    skipped: list[str] = field(default_factory=list)  # job ids already done by an earlier run
    failed: dict[int, str] = field(default_factory=dict)  # line number -> error
    files: list[Path] = field(default_factory=list)  # every output of this run


# -- reading the jobs file ------------------------------------------------------------------------


def read_jobs(jobs_path: Path, max_jobs: int, allowed_models: set[str] | None = None, tasks=None) -> list[Job]:
    """Parse a JSONL or CSV jobs file; bad lines become jobs with an error, not an exception.

    Only a file that cannot be read at all, has too many jobs, or (CSV) names a column twice
    raises StudioInputError. `allowed_models`: when given, a line naming another model is bad.
    """
    jobs_path = Path(jobs_path)
    text = _read_text(jobs_path)
    rows = _csv_rows(text) if jobs_path.suffix.lower() == ".csv" else _jsonl_rows(text)
    if len(rows) > max_jobs:
        raise StudioInputError(f"jobs file {str(jobs_path)!r} has {len(rows)} jobs, more than the limit of {max_jobs}")
    folder = jobs_path.parent.resolve()
    parse = tasks.parse_request if tasks else parse_request  # `tasks`: the studio's registry, if not the built-in
    jobs = [_parse_row(line, raw, data, folder, allowed_models, parse) for line, raw, data in rows]
    _refuse_shared_outputs(jobs)
    return jobs


def _read_text(jobs_path: Path) -> str:
    try:
        text = jobs_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StudioInputError(f"jobs file {str(jobs_path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise StudioInputError(f"jobs file {str(jobs_path)!r} cannot be read: {error}") from None
    return text.removeprefix("\ufeff")  # the byte-order mark some Windows editors put first


def _jsonl_rows(text: str) -> list[tuple[int, str, object]]:
    """(line number, line, parsed value or the StudioInputError saying why it is not one)."""
    rows = []
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and others that splitlines breaks at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rows.append((number, line, _json_value(line)))
    return rows


def _json_value(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        return StudioInputError(f"not valid JSON: {error.msg} at column {error.colno}")
    except RecursionError:
        return StudioInputError("this line nests lists or objects too deeply to be read")
    except ValueError:  # Python refuses to convert integers longer than its limit
        return StudioInputError(f"a number in this line has more than {sys.get_int_max_str_digits()} digits")


def _csv_rows(text: str) -> list[tuple[int, str, object]]:
    """CSV with a header of request field names; cells that parse as JSON numbers/bools/lists are typed.

    A header naming a column twice refuses the whole file (one of the two would be dropped
    silently); a row the csv module cannot read is that row's failure only.
    """
    reader = csv.reader(io.StringIO(text))
    header = _csv_header(reader)
    rows = []
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as error:  # e.g. a cell over the csv module's size limit
            message = f"not valid CSV: {error}"
            rows.append((reader.line_num, message, StudioInputError(message)))
            continue
        if cells:  # a blank line is no job
            rows.append((reader.line_num, _csv_raw(header, cells), _csv_data(header, cells)))
    return rows


def _csv_header(reader) -> list[str]:
    try:
        header = next(reader, [])
    except csv.Error as error:
        raise StudioInputError(f"the CSV header cannot be read: {error}") from None
    counts = Counter(name.strip() for name in header)
    repeated = [name for name, count in counts.items() if name and count > 1]
    if repeated:
        names = ", ".join(repr(name) for name in repeated)
        raise StudioInputError(f"the CSV header names the column {names} more than once; keep one of each")
    return header


def _csv_raw(header: list[str], cells: list[str]) -> str:
    """The row's text for its job id: the same as csv.DictReader's row gave, so that ids (and resume) carry over."""
    row = dict(zip(header, cells))
    row.update(dict.fromkeys(header[len(cells) :]))  # missing cells: None, as DictReader fills them
    extra = cells[len(header) :]
    return json.dumps(row, sort_keys=True) + (json.dumps(extra) if extra else "")


def _csv_data(header: list[str], cells: list[str]):
    if any(cell != "" for cell in cells[len(header) :]):
        return StudioInputError(f"this row has {len(cells)} cells but the header names only {len(header)} columns")
    data = {}
    for key, value in zip(header, cells):
        if value != "":  # an empty cell leaves the field unset
            data[key.strip()] = _typed_cell(value)
    return data


def _typed_cell(value: str):
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):  # not JSON, an over-long number, deep nesting: keep the text
        return value
    return value if isinstance(parsed, str) else parsed


def _parse_row(line: int, raw: str, data, folder: Path, allowed_models: set[str] | None, parse) -> Job:
    job = Job(line, f"{line:05d}-{hashlib.sha256(raw.encode()).hexdigest()[:8]}")
    if isinstance(data, StudioInputError):  # the line is not JSON (or not a CSV row) at all
        job.error = _reason(data)
        return job
    try:
        request = parse(data)  # image paths still as written, so that its messages quote them
        _check_model(request, allowed_models)
        job.request, job.written = _resolve_image_paths(request, folder)
    except Exception as error:  # whatever parsing one line raises is that line's failure, not the batch's
        job.request, job.error = None, _reason(error)
    return job


def _resolve_image_paths(request: BaseRequest, folder: Path) -> tuple[BaseRequest, dict[str, str]]:
    """Image paths are relative to the jobs file's folder and may not leave it.

    Returns the request with absolute paths, and each absolute path -> the value as written.
    """
    resolved, written = {}, {}
    for name, value in request.image_fields().items():
        if not isinstance(value, str) or "\x00" in value:
            raise StudioInputError(f"{name} must be a path relative to the jobs file, got {value!r}")
        path = (folder / value).resolve()
        if os.path.isabs(value) or folder not in path.parents:
            raise StudioInputError(f"{name} {value!r} is outside the jobs file's folder")
        resolved[name] = str(path)
        written[str(path)] = value
    return request.model_copy(update=resolved), written


def _check_model(request: BaseRequest, allowed_models: set[str] | None) -> None:
    # Checked on the name alone: a server never looks at a path a jobs file names.
    if allowed_models is not None and request.model and request.model not in allowed_models:
        raise StudioInputError(f"model {request.model!r} is not one this server offers")


def _refuse_shared_outputs(jobs: list[Job]) -> None:
    """A line naming an output file an earlier line names fails, naming that line: one image would be lost."""
    owners: dict[str, int] = {}  # output file, case-folded -> the line naming it
    for job in jobs:
        if job.request is None or job.request.output is None:
            continue
        try:
            files = _output_files(Path(clean_output_name(job.request.output)), job.request)
        except StudioInputError as error:  # a bad name: fail now, before anything renders
            job.request, job.error = None, _reason(error)
            continue
        # Case-folded: "A.png" and "a.png" are one file on macOS and Windows.
        keys = [str(path).casefold() for path in files]
        earlier = [owners[key] for key in keys if key in owners]
        if earlier:
            job.error = _one_line(f"output {job.request.output!r} is also named by line {earlier[0]}")
            job.request = None
            continue
        owners.update(dict.fromkeys(keys, job.line))


def _output_files(target: Path, request: BaseRequest) -> list[Path]:
    """The files a request's images go to: target, or target-1.png, target-2.png, ... for several.

    Numbering touches the file name only, so a folder's own name may hold anything ("{seed}" too).
    """
    return [target.with_name(path.name) for path in output_names(target.name, seeds_for(request, 0))]


# -- failures as one line -------------------------------------------------------------------------


def _reason(error: BaseException, written: dict[str, str] | None = None) -> str:
    """Why a line failed, in one line; `written`: server paths -> the line's own text to show instead."""
    try:
        text = str(error)
    except Exception:  # an exception whose message itself fails
        text = ""
    for server_path in sorted(written or {}, key=len, reverse=True):  # longest first: a file before its folder
        text = text.replace(server_path, written[server_path])
        # Messages quote paths with repr(), which doubles a backslash: replace that form too.
        text = text.replace(repr(server_path)[1:-1], repr(written[server_path])[1:-1])
    text = _one_line(text)
    if not isinstance(error, StudioInputError):  # say what kind of failure it was: "MemoryError: ..."
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return _one_line(text) or type(error).__name__


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    first = lines[0].strip() if lines else ""
    return first if len(first) <= MAX_REASON_CHARS else first[: MAX_REASON_CHARS - 1] + "…"


# -- the manifest -----------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, dict]:
    """Job id -> last recorded entry. A torn last line (killed while appending) is ignored."""
    entries: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                entries[entry["job"]] = entry
            except (ValueError, RecursionError, KeyError, TypeError):
                continue
    return entries


def _append_manifest(path: Path, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _done_before(entry: dict | None, root: Path) -> bool:
    """The manifest says the job is done and each file it lists is still there."""
    if not entry or entry.get("state") != "done" or not isinstance(entry.get("files"), list) or not entry["files"]:
        return False
    try:
        return all((root / name).is_file() for name in entry["files"])
    except (TypeError, ValueError, OSError):  # a damaged entry: the job runs again (its files are checked then)
        return False


# -- running ----------------------------------------------------------------------------------------


@dataclass
class JobPlan:
    """What a job renders and where: decided by the job's identity alone, so every run (and every
    worker of a cluster) that plans the same job names the same files."""

    request: BaseRequest  # the line's request, its seed filled in from the job id when the line set none
    paths: list[Path]  # the files its images go to, in image order
    own: set[Path]  # the paths already holding this job's own images (written by an earlier run)

    @property
    def written(self) -> bool:
        """Every file was written by an earlier run (killed after writing them, before its manifest line)."""
        return len(self.own) == len(self.paths)


class BatchRecorder:
    """The manifest, the summary and the on_job report, kept in step: one call per job outcome."""

    def __init__(self, root: Path, on_job=None):
        self.root = root
        self.manifest_path = root / MANIFEST_NAME
        self.manifest = read_manifest(self.manifest_path)  # what earlier runs recorded
        self.summary = BatchSummary()
        self._report = on_job or (lambda job, status, detail: None)

    def settled(self, job: Job) -> bool:
        """Record a bad line as failed and a job done by an earlier run as skipped; False: it needs rendering."""
        if job.error is not None:
            self.failed(job, job.error)
            return True
        if _done_before(self.manifest.get(job.job_id), self.root):
            self.summary.skipped.append(job.job_id)
            self._report(job, "skipped", "already done")
            return True
        return False

    def failed(self, job: Job, reason: str) -> None:
        self.summary.failed[job.line] = reason
        _append_manifest(self.manifest_path, {"job": job.job_id, "line": job.line, "state": "failed", "error": reason})
        self._report(job, "failed", reason)

    def done(self, job: Job, paths: list[Path], rendered: bool, warnings: list[str]) -> None:
        """Files on disk, written for this job: `rendered` by this run, or (False) found from an earlier one."""
        relative = [str(path.relative_to(self.root)) for path in paths]
        entry = {"job": job.job_id, "line": job.line, "state": "done", "files": relative}
        _append_manifest(self.manifest_path, {**entry, "warnings": warnings} if warnings else entry)
        if rendered:
            self.summary.rendered.append(job.job_id)
            self.summary.files.extend(paths)
            self._report(job, "done", "; warning: ".join([", ".join(relative), *warnings]))
        else:
            self.summary.skipped.append(job.job_id)
            self._report(job, "skipped", "already done (its files were written by an earlier run)")


def start_batch(
    jobs_path: Path, out_dir: Path, max_jobs: int, allowed_models: set[str] | None = None, tasks=None, on_job=None
) -> tuple[list[Job], BatchRecorder]:
    """What every batch engine does first: the output folder made and cleared of torn temp files, the jobs
    read, the manifest of earlier runs read."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = out_dir.resolve()
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        remove_stale_temp_files(folder)
    jobs = read_jobs(jobs_path, max_jobs, allowed_models, tasks)
    return jobs, BatchRecorder(root, on_job)


def run_batch(
    studio,
    jobs_path: Path,
    out_dir: Path,
    progress_factory=None,
    on_job=None,
    allowed_models: set[str] | None = None,
) -> BatchSummary:
    """Render every job not already done into out_dir. `on_job(job, status, detail)` reports each job
    as "done", "skipped" (done before) or "failed" (detail: one line saying why).

    Any exception of one job is that job's recorded failure; only KeyboardInterrupt and a cancel
    (GenerationCancelled) stop the batch. `allowed_models`: when given, a line naming another model
    fails without anything being loaded (the web UI passes the models it offers).
    """
    tasks = getattr(studio, "tasks", None)
    jobs, record = start_batch(jobs_path, out_dir, studio.settings.max_batch_lines, allowed_models, tasks, on_job)
    for job in jobs:
        if record.settled(job):
            continue
        try:
            paths, rendered, warnings = _render_job(studio, job, record.root, progress_factory or Progress)
        except Exception as error:  # whatever one job raises is that job's failure, never the batch's
            if isinstance(error, GenerationCancelled) and not isinstance(error, JobTimedOut):
                raise  # the user cancelled: stop (a job's own time limit fails that job only)
            record.failed(job, failure_reason(error, job, record.root))
            continue
        record.done(job, paths, rendered, warnings)
    return record.summary


def failure_reason(error: BaseException, job: Job, root: Path) -> str:
    """One line; paths as the line wrote them, files in the output folder relative to it (no server folders)."""
    return _reason(error, {**job.written, f"{root}{os.sep}": ""})


def _render_job(studio, job: Job, root: Path, new_progress) -> tuple[list[Path], bool, list[str]]:
    """Render one job and write its files; returns them, False when an earlier run had written them all,
    and the render's warnings (a truncated prompt...)."""
    plan = plan_job(job, root)
    if plan.written:
        return plan.paths, False, []
    result = studio.run(plan.request, new_progress())
    write_job_files(plan, [result.png(index) for index in range(len(result.images))], root)
    return plan.paths, True, list(result.warnings)


def plan_job(job: Job, root: Path) -> JobPlan:
    """The job's request (seeded) and files; raises StudioInputError when a file holds another image."""
    request = job.request
    if request.seed is None:
        # A seed from the job's identity: a rerun after a kill makes the same images.
        request = request.model_copy(update={"seed": int(job.job_id[-8:], 16)})
    target = safe_output_path(root, request.output) if request.output is not None else root / f"{job.job_id}.png"
    paths = _output_files(target, request)
    return JobPlan(request, paths, _own_files(paths, request, root))


def write_job_files(plan: JobPlan, pngs: list[bytes], root: Path) -> None:
    """Write each image not yet on disk, atomically and never over another file.

    A file that appeared meanwhile is accepted only when it holds this job's own image (the same job
    rendered twice, as a cluster does when it retries a task): one file, never a replaced one.
    """
    if len(pngs) != len(plan.paths):
        raise RuntimeError(f"the render made {len(pngs)} images where {len(plan.paths)} were expected")
    seeds = seeds_for(plan.request, 0)
    for index, (path, png) in enumerate(zip(plan.paths, pngs)):
        if path in plan.own or atomic_write_new(path, png):
            continue
        if not _holds_image_of(path, plan.request, index, seeds[index]):
            raise _taken(path, root)  # appeared while rendering, holding something else


def _own_files(paths: list[Path], request: BaseRequest, root: Path) -> set[Path]:
    """The paths that already hold this job's own images; a path holding anything else is refused."""
    seeds = seeds_for(request, 0)
    own = set()
    for index, path in enumerate(paths):
        if not os.path.lexists(path):
            continue
        if not _holds_image_of(path, request, index, seeds[index]):
            raise _taken(path, root)
        own.add(path)
    return own


def _holds_image_of(path: Path, request: BaseRequest, index: int, seed: int) -> bool:
    """Whether the PNG's studio metadata records this request (seed included) and this image of its batch."""
    try:
        record = read_record(path)
        recorded = request_to_json(record.request)
        expected = request_to_json(request)
    except Exception:  # not a studio PNG, or not readable: not this job's
        return False
    if record.image_index != index or record.seed != seed:
        return False
    # Compare what the line sets; the rest the studio filled in (the model's recommendations, the seeds it
    # drew, the model's absolute path). The PNG records the seeds as a list for several images.
    named = (request.model_fields_set | {"task"}) - {"seed", "model"}
    if any(recorded.get(name) != expected.get(name) for name in named):
        return False
    return request.model is None or _same_model(request.model, record.request.model)


def _same_model(line_model: str, recorded_model: str | None) -> bool:
    """The line's model (as typed) and the one a PNG records (its absolute path, "embedded" or a hub id)."""
    if recorded_model is None or line_model == recorded_model:
        return line_model == recorded_model
    try:
        return Path(line_model).expanduser().resolve() == Path(recorded_model).resolve()
    except (OSError, ValueError):
        return False


def _taken(path: Path, root: Path) -> StudioInputError:
    return StudioInputError(
        f"output {str(path.relative_to(root))!r} exists already; give this line another output name"
    )
