"""Batch rendering survives every bad line: each attack is a test whose input is the attack.

For each: the bad line is recorded as failed with a one-line reason, the good lines after it
are done with their files on disk, and a rerun renders nothing new and stops nowhere. Then
property-based fuzzing: read_jobs on arbitrary JSONL/CSV text, and run_batch with a fake
studio whose renders raise arbitrary exceptions.
"""

import csv
import io
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import counting_http_server as loopback_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from studio.batch import MANIFEST_NAME, MAX_REASON_CHARS, read_jobs, run_batch
from studio.core import Result
from studio.metadata import ImageRecord, read_record
from studio.outputs import MAX_NAME_BYTES, safe_output_path
from studio.progress import GenerationCancelled, JobTimedOut
from studio.requests import StudioInputError, seeds_for


def good(n: int, **fields) -> dict:
    """A line that renders: the tiny model, one step, 64x64."""
    return {"prompt": f"good {n}", "seed": n, "num_inference_steps": 1, "width": 64, "height": 64, **fields}


def write_jobs(path: Path, lines: list, prefix: str = "") -> Path:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    path.write_text(prefix + text, encoding="utf-8")
    return path


def line_of(job_id: str) -> int:
    return int(job_id.split("-")[0])


def assert_one_line(reason: str) -> None:
    assert reason and len(reason) <= MAX_REASON_CHARS
    assert reason.splitlines() == [reason], reason
    assert "Traceback" not in reason


def run_twice(studio, jobs: Path, out: Path, *, bad: list[int], good_lines: list[int], **options):
    """Run the batch, check the outcome line by line, rerun it, and check that the rerun renders nothing."""
    first = run_batch(studio, jobs, out, **options)
    assert sorted(first.failed) == bad, first.failed
    for reason in first.failed.values():
        assert_one_line(reason)
    assert sorted(line_of(job) for job in first.rendered) == good_lines
    for path in first.files:
        assert path.is_file()
        assert read_record(path).request.prompt.startswith("good")
    second = run_batch(studio, jobs, out, **options)
    assert second.rendered == [] and second.files == []
    assert sorted(second.skipped) == sorted(first.rendered + first.skipped)
    assert second.failed == first.failed
    return first


# -- a fake studio: renders in no time, or raises what it is told -------------------------------------


class Boom(Exception):
    """An exception type the batch cannot know."""


class BadMessage(Exception):
    def __str__(self):
        raise RuntimeError("the message itself fails")


# Factories: an exception instance raised again would carry all its earlier tracebacks.
EXCEPTIONS = {
    "type": lambda: TypeError("unhashable type: 'list'"),
    "key": lambda: KeyError("missing"),
    "value": lambda: ValueError("bad value"),
    "runtime": lambda: RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"),
    "os": lambda: OSError(28, "No space left on device"),
    "memory": lambda: MemoryError(),
    "recursion": lambda: RecursionError("maximum recursion depth exceeded"),
    "zero": lambda: ZeroDivisionError("division by zero"),
    "attribute": lambda: AttributeError("'NoneType' object has no attribute 'pipe'"),
    "assertion": lambda: AssertionError(),
    "input": lambda: StudioInputError("image 'x.png' does not exist"),
    "timeout": lambda: JobTimedOut("the job ran longer than the limit of 1 s per job"),
    "custom": lambda: Boom("\n\nfirst line after blanks\nsecond line"),
    "huge": lambda: Boom("x" * 100_000),
    "unprintable": lambda: BadMessage(),
}


class FakeStudio:
    """Studio.run's contract without a model: 8x8 images whose records hold the request and seeds."""

    def __init__(self):
        self.settings = SimpleNamespace(max_batch_lines=10_000)
        self.calls = 0

    def run(self, request, progress=None):
        self.calls += 1
        if request.prompt.startswith("raise:"):
            raise EXCEPTIONS[request.prompt.removeprefix("raise:")]()
        seeds = seeds_for(request, 0)
        recorded = request.model_copy(update={"seed": seeds if len(seeds) > 1 else seeds[0]})
        records = [ImageRecord(recorded, index, seed) for index, seed in enumerate(seeds)]
        return Result(recorded, [Image.new("RGB", (8, 8), "red") for _ in seeds], records)


# -- the attacks, one test each ---------------------------------------------------------------------
# An attack refused before rendering never reaches a model, so the fake studio renders the good lines
# around it; the tiny real model renders where the model, input images or PNG metadata matter.


def test_deeply_nested_line(tmp_path):
    studio = FakeStudio()
    jobs = write_jobs(tmp_path / "jobs.jsonl", [good(1), "[" * 100_000 + "]" * 100_000, good(3)])
    summary = run_twice(studio, jobs, tmp_path / "out", bad=[2], good_lines=[1, 3])
    assert "too deeply" in summary.failed[2]


def test_seed_with_5000_digits(tmp_path):
    studio = FakeStudio()
    jobs = write_jobs(tmp_path / "jobs.jsonl", [good(1), '{"prompt": "x", "seed": ' + "9" * 5000 + "}", good(3)])
    summary = run_twice(studio, jobs, tmp_path / "out", bad=[2], good_lines=[1, 3])
    assert "digits" in summary.failed[2]


def test_task_given_as_a_list(tmp_path):
    studio = FakeStudio()
    jobs = write_jobs(tmp_path / "jobs.jsonl", [good(1), {"task": ["inpaint"]}, good(3)])
    run_twice(studio, jobs, tmp_path / "out", bad=[2], good_lines=[1, 3])


def test_output_name_too_long_for_the_file_system(tmp_path):
    studio = FakeStudio()
    jobs = write_jobs(tmp_path / "jobs.jsonl", [good(1), good(2, output="x" * 254), good(3)])
    summary = run_twice(studio, jobs, tmp_path / "out", bad=[2], good_lines=[1, 3])
    assert "too long" in summary.failed[2]


def test_longest_output_name_is_written_with_numbering(tmp_path):
    studio = FakeStudio()
    longest = "y" * (MAX_NAME_BYTES - len("-16") - len(".png"))
    jobs = write_jobs(tmp_path / "jobs.jsonl", [good(1, output=longest, batch_size=2)])
    summary = run_twice(studio, jobs, tmp_path / "out", bad=[], good_lines=[1])
    assert sorted(path.name for path in summary.files) == [f"{longest}-1.png", f"{longest}-2.png"]
    with pytest.raises(StudioInputError, match="too long"):
        safe_output_path(tmp_path, longest + "y")
    with pytest.raises(StudioInputError, match="too long"):
        safe_output_path(tmp_path, "z" * 198 + "/a.png")  # a folder name counts too


def test_model_whose_index_names_a_list_as_its_class(studio, tmp_path):
    model = tmp_path / "bad-model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": ["StableDiffusionPipeline"]}))
    jobs = write_jobs(tmp_path / "jobs.jsonl", [good(1), good(2, model=str(model)), good(3)])
    run_twice(studio, jobs, tmp_path / "out", bad=[2], good_lines=[1, 3])


def test_two_lines_naming_one_output(tmp_path):
    studio = FakeStudio()
    jobs = write_jobs(tmp_path / "jobs.jsonl", [good(1, output="same.png"), good(2, output="same"), good(3)])
    out = tmp_path / "out"
    summary = run_twice(studio, jobs, out, bad=[2], good_lines=[1, 3])
    assert summary.failed[2] == "output 'same' is also named by line 1"
    assert read_record(out / "same.png").request.prompt == "good 1"


def test_output_taken_by_another_jobs_image(tmp_path):
    studio = FakeStudio()
    out = tmp_path / "out"
    earlier = run_batch(studio, write_jobs(tmp_path / "earlier.jsonl", [good(7, output="same.png")]), out)
    before = (out / "same.png").read_bytes()
    jobs = write_jobs(tmp_path / "jobs.jsonl", [good(1), good(2, output="same.png"), good(3)])
    summary = run_twice(studio, jobs, out, bad=[2], good_lines=[1, 3])
    assert summary.failed[2] == "output 'same.png' exists already; give this line another output name"
    assert (out / "same.png").read_bytes() == before and len(earlier.rendered) == 1


def test_output_taken_by_a_file_that_is_no_studio_image(tmp_path):
    studio = FakeStudio()
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / "same.png")
    (out / "notes.png").write_text("not an image")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [good(1), good(2, output="same"), good(3, output="notes"), good(4)])
    summary = run_twice(studio, jobs, out, bad=[2, 3], good_lines=[1, 4])
    assert "exists already" in summary.failed[2] and "exists already" in summary.failed[3]
    assert (out / "notes.png").read_text() == "not an image"


def test_output_written_before_a_kill_counts_as_done(studio, tmp_path):
    """Killed after writing the PNGs but before the manifest line: the rerun finds them and keeps them."""
    lines = [good(1, output="a.png"), good(2, batch_size=2), good(3, seed=None)]  # 3: the seed comes from the line
    jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "out"
    first = run_batch(studio, jobs, out)
    files = {path: path.read_bytes() for path in first.files}
    assert len(files) == 4
    (out / MANIFEST_NAME).unlink()
    reports = []
    rerun = run_batch(studio, jobs, out, on_job=lambda job, status, detail: reports.append(status))
    assert rerun.rendered == [] and sorted(rerun.skipped) == sorted(first.rendered) and reports == ["skipped"] * 3
    assert {path: path.read_bytes() for path in first.files} == files
    # The manifest holds them again: a third run skips them without reading the PNGs.
    assert run_batch(studio, jobs, out).skipped == rerun.skipped


def test_half_written_batch_renders_only_the_missing_image(tmp_path):
    studio = FakeStudio()
    jobs = write_jobs(tmp_path / "jobs.jsonl", [good(1, batch_size=2)])
    out = tmp_path / "out"
    first, second = run_batch(studio, jobs, out).files
    kept = first.read_bytes()
    (out / MANIFEST_NAME).unlink()
    second.unlink()
    rerun = run_batch(studio, jobs, out)
    assert rerun.files == [first, second] and not rerun.failed
    assert first.read_bytes() == kept and read_record(second).seed == 2


def test_bom_at_the_start_of_a_jsonl_file(tmp_path):
    studio = FakeStudio()
    jobs = write_jobs(tmp_path / "jobs.jsonl", [good(1), "{bad", good(3)], prefix="\ufeff")
    run_twice(studio, jobs, tmp_path / "out", bad=[2], good_lines=[1, 3])


def test_bom_at_the_start_of_a_csv_file(tmp_path):
    studio = FakeStudio()
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("\ufeffprompt,seed,num_inference_steps,width,height\ngood 1,1,1,64,64\nbad,1,1,100,64\ngood 3,3,1,64,64\n")
    summary = run_twice(studio, jobs, tmp_path / "out", bad=[3], good_lines=[2, 4])
    assert "width" in summary.failed[3]


def test_duplicate_csv_columns_refuse_the_file(tmp_path):
    studio = FakeStudio()
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("prompt,seed,num_inference_steps,seed \ngood 1,1,1,5\n")
    with pytest.raises(StudioInputError, match="'seed'"):
        run_batch(studio, jobs, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.png"))


def test_csv_row_with_more_cells_than_columns(tmp_path):
    studio = FakeStudio()
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("prompt,seed,num_inference_steps\ngood 1,1,1\ngood 2,2,1,surplus\ngood 3,3,1,\n")
    summary = run_twice(studio, jobs, tmp_path / "out", bad=[3], good_lines=[2, 4])
    assert "cells" in summary.failed[3]


def test_image_errors_name_the_value_as_written(studio, tmp_path):
    """In the web UI the jobs file sits in a server temp folder: no message may show that folder."""
    folder = tmp_path / "private-server-folder"
    folder.mkdir()
    inpaint = {"task": "inpaint", "prompt": "x", "num_inference_steps": 1}
    lines = [
        good(1),
        {**inpaint, "image": "https://example.com/cat.png"},
        {**inpaint, "image": "../x.png"},
        {**inpaint, "image": "missing.png"},
        good(5, image="in.png"),  # text_to_image takes no image: the field is refused
        {**inpaint, "image": "sub"},  # a folder, not an image
        good(7),
    ]
    (folder / "sub").mkdir()
    jobs = write_jobs(folder / "jobs.jsonl", lines)
    summary = run_twice(studio, jobs, tmp_path / "out", bad=[2, 3, 4, 5, 6], good_lines=[1, 7])
    for reason in summary.failed.values():
        assert str(folder) not in reason and str(tmp_path) not in reason
    assert "'https://example.com/cat.png'" in summary.failed[2]
    assert "'../x.png'" in summary.failed[3]
    assert "'missing.png'" in summary.failed[4]
    assert "'in.png'" in summary.failed[5]
    assert "'sub'" in summary.failed[6]


def test_allowed_models_refuse_other_models_without_loading_them(studio, tmp_path):
    model = tmp_path / "bad-model"  # would fail loudly if anything read it
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": ["StableDiffusionPipeline"]}))
    lines = [good(1), good(2, model=str(model)), good(3, model="/etc"), good(4, model="tiny")]
    jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
    reasons = run_twice(studio, jobs, tmp_path / "out", bad=[2, 3, 4], good_lines=[1], allowed_models={"other"}).failed
    assert reasons[2] == f"model {str(model)!r} is not one this server offers"
    assert reasons[3] == "model '/etc' is not one this server offers"


def test_result_save_without_overwrite_refuses_an_existing_file(studio, tmp_path):
    result = studio.run(read_jobs(write_jobs(tmp_path / "j.jsonl", [good(1)]), 1)[0].request)
    [path] = result.save(tmp_path / "a.png", overwrite=False)
    before = path.read_bytes()
    with pytest.raises(StudioInputError, match="a.png"):
        result.save(tmp_path / "a.png", overwrite=False)
    assert path.read_bytes() == before


def test_any_exception_of_a_job_is_that_lines_failure(tmp_path):
    lines = [{"prompt": "good 0"}]
    for name in EXCEPTIONS:
        lines += [{"prompt": f"raise:{name}"}, {"prompt": f"good after {name}"}]
    jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
    bad = list(range(2, len(lines) + 1, 2))
    summary = run_twice(FakeStudio(), jobs, tmp_path / "out", bad=bad, good_lines=[1, *range(3, len(lines) + 1, 2)])
    reasons = {lines[line - 1]["prompt"].removeprefix("raise:"): reason for line, reason in summary.failed.items()}
    assert reasons["runtime"] == "RuntimeError: CUDA out of memory."
    assert reasons["input"] == "image 'x.png' does not exist"
    assert reasons["custom"] == "Boom: first line after blanks"
    assert reasons["memory"] == "MemoryError" and reasons["unprintable"] == "BadMessage"
    manifest = [json.loads(line) for line in (tmp_path / "out" / MANIFEST_NAME).read_text().splitlines()]
    assert {entry["line"]: entry["error"] for entry in manifest if entry["state"] == "failed"} == summary.failed


class StoppingStudio(FakeStudio):
    """Raises `stop` for the prompt "stop"."""

    def __init__(self, stop: BaseException):
        super().__init__()
        self.stop = stop

    def run(self, request, progress=None):
        if request.prompt == "stop":
            self.calls += 1
            raise self.stop
        return super().run(request, progress)


@pytest.mark.parametrize("stop", [GenerationCancelled("cancelled by the user"), KeyboardInterrupt()])
def test_only_a_cancel_or_ctrl_c_stops_the_batch(tmp_path, stop):
    studio = StoppingStudio(stop)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "good 1"}, {"prompt": "stop"}, {"prompt": "good 3"}])
    with pytest.raises(type(stop)):
        run_batch(studio, jobs, tmp_path / "out")
    assert studio.calls == 2
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_cli_reports_each_attack_in_one_line_and_goes_on(sd15_folder, tmp_path, capsys):
    """The reproductions through `studio batch`: exit 1 for the failed lines, every good line rendered."""
    from studio.cli import main

    lines = [
        good(1, output="same"),
        "[" * 100_000 + "]" * 100_000,
        '{"prompt": "x", "seed": ' + "9" * 5000 + "}",
        {"task": ["inpaint"]},
        good(5, output="x" * 254),
        good(6, output="same"),
        good(7),
    ]
    jobs = write_jobs(tmp_path / "jobs.jsonl", lines, prefix="\ufeff")
    command = ["batch", str(jobs), "--out", str(tmp_path / "out"), "--model", str(sd15_folder), "--quiet"]
    assert main(command) == 1
    first = capsys.readouterr()
    assert "2 rendered, 0 already done, 5 failed" in first.out
    failed = [line for line in first.err.splitlines() if ": failed: " in line]
    assert [line.split(":")[0] for line in failed] == [f"line {n}" for n in range(2, 7)]
    assert main(command) == 1
    second = capsys.readouterr()
    assert "0 rendered, 2 already done, 5 failed" in second.out
    assert "Traceback" not in first.err + second.err


# -- property-based fuzzing -----------------------------------------------------------------------------

FIELDS = [
    "task", "prompt", "negative_prompt", "seed", "width", "height", "num_inference_steps", "guidance_scale",
    "scheduler", "batch_size", "model", "output", "image", "mask_image", "control_image", "reference_image",
    "strength", "method", "eta", "bogus",
]
TASK_NAMES = ["text_to_image", "sketch_to_image", "inpaint", "style_transfer", "imagic"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30) | st.sampled_from(TASK_NAMES),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
request_dicts = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
deep_nesting = st.sampled_from([10, 999, 1001, 100_000]).map(lambda n: "[" * n + "]" * n)
huge_numbers = st.integers(4000, 6000).map(lambda n: '{"seed": ' + "7" * n + "}")


def dumps(value) -> str:
    return json.dumps(value, allow_nan=True)


jsonl_lines = st.one_of(
    json_values.map(dumps),
    request_dicts.map(dumps),
    st.text(max_size=40),
    deep_nesting,
    huge_numbers,
    st.just("# a comment"),
    st.just(""),
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def expected_jsonl_lines(text: str) -> list[int]:
    """Line numbers holding a job: not blank, not a comment (as read: newlines translated, BOM dropped)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").removeprefix("\ufeff")
    return [n for n, line in enumerate(text.split("\n"), 1) if line.strip() and not line.lstrip().startswith("#")]


def assert_well_formed(jobs) -> None:
    for job in jobs:
        assert (job.request is None) != (job.error is None), job
        if job.error is not None:
            assert_one_line(job.error)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lines=st.lists(jsonl_lines, max_size=8), allowed=st.none() | st.sets(st.text(max_size=5), max_size=2))
def test_fuzz_read_jobs_jsonl(fuzz_dir, lines, allowed):
    text = "\n".join(lines)
    path = fuzz_dir / "jobs.jsonl"
    path.write_text(text, encoding="utf-8")
    jobs = read_jobs(path, max_jobs=10_000, allowed_models=allowed)
    assert [job.line for job in jobs] == expected_jsonl_lines(text)
    assert_well_formed(jobs)


csv_cells = st.one_of(
    st.text(max_size=20),
    json_values.map(dumps),
    st.integers(4000, 6000).map(lambda n: "7" * n),
    st.just("x" * 200_000),  # over the csv module's cell limit
    st.sampled_from(TASK_NAMES),
)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    header=st.lists(st.sampled_from(FIELDS + ["", " seed"]), min_size=1, max_size=6),
    rows=st.lists(st.lists(csv_cells, max_size=7), max_size=6),
    bom=st.booleans(),
)
def test_fuzz_read_jobs_csv(fuzz_dir, header, rows, bom):
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    path = fuzz_dir / "jobs.csv"
    path.write_text(("\ufeff" if bom else "") + buffer.getvalue(), encoding="utf-8", newline="")
    names = [name.strip() for name in header if name.strip()]
    if len(set(names)) < len(names):
        with pytest.raises(StudioInputError, match="more than once"):
            read_jobs(path, max_jobs=10_000)
        return
    jobs = read_jobs(path, max_jobs=10_000)
    if not any(len(cell) > csv.field_size_limit() for row in rows for cell in row):
        # (A row the csv module gives up on leaves the rest of its cells to be read as rows of their own.)
        assert len(jobs) == sum(1 for row in rows if row)
    assert [job.line for job in jobs] == sorted({job.line for job in jobs})
    assert_well_formed(jobs)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=300), bom=st.booleans())
def test_fuzz_read_jobs_csv_garbage(fuzz_dir, text, bom):
    path = fuzz_dir / "garbage.csv"
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    try:
        jobs = read_jobs(path, max_jobs=10_000)
    except StudioInputError as error:  # a file-level refusal (a column named twice) is allowed, and one line
        assert_one_line(str(error)[:MAX_REASON_CHARS])
        return
    assert_well_formed(jobs)


bad_lines = st.one_of(
    st.sampled_from(["{not json", "[" * 5000 + "]" * 5000, '{"seed": ' + "9" * 5000 + "}", '{"task": ["inpaint"]}']),
    st.sampled_from([{"width": 100}, {"output": "../x"}, {"output": "x" * 254}, {"image": "a.png"}, {"bogus": 1}]),
    request_dicts.map(lambda data: {**data, "seed": -1}),  # whatever else it holds, the seed is out of range
)
job_specs = st.one_of(
    st.tuples(st.just("good"), st.integers(1, 3), st.booleans()),  # batch_size, named output or not
    st.tuples(st.just("raises"), st.sampled_from(sorted(EXCEPTIONS)), st.booleans()),
    st.tuples(st.just("bad"), bad_lines, st.booleans()),
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(job_specs, max_size=6))
def test_fuzz_run_batch_never_stops_early(specs):
    lines, good_lines, bad = [], [], []
    for number, (kind, value, named) in enumerate(specs, start=1):
        output = {"output": f"o{number}"} if named else {}
        if kind == "good":
            lines.append({"prompt": f"good {number}", "batch_size": value, **output})
            good_lines.append(number)
        elif kind == "raises":
            lines.append({"prompt": f"raise:{value}", **output})
            bad.append(number)
        else:
            lines.append(value)
            bad.append(number)
    with tempfile.TemporaryDirectory() as folder:
        jobs = write_jobs(Path(folder) / "jobs.jsonl", lines)
        summary = run_twice(FakeStudio(), jobs, Path(folder) / "out", bad=bad, good_lines=good_lines)
        expected_files = sum(lines[n - 1]["batch_size"] for n in good_lines)
        assert len(summary.files) == expected_files == len(list((Path(folder) / "out").rglob("*.png")))


# == reliability-cases.md, case by case: attacks no test above sends =================================

import struct  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
from PIL import PngImagePlugin  # noqa: E402

from studio import core as studio_core  # noqa: E402


class _CreatesFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A PNG of a few bytes whose header claims side x side pixels (30 GB once decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


STYLE = {"task": "style_transfer", "num_inference_steps": 1, "strength": 1.0, "width": 64, "height": 64}


# -- reliability-cases.md #1, #2: image paths that leave the jobs file's folder ------------------------------


def test_case_1_2_image_paths_that_leave_the_jobs_folder_read_nothing_outside(studio, tmp_path, monkeypatch):
    folder = tmp_path / "jobs"
    folder.mkdir()
    secret = tmp_path / "secret.png"
    Image.new("RGB", (64, 64), "blue").save(secret)
    (folder / "link.png").symlink_to(secret)  # a symlink inside pointing out
    (folder / ".env").write_text("SECRET=1")
    opened = []
    original = studio_core.open_image
    monkeypatch.setattr(studio_core, "open_image", lambda source, **kw: opened.append(Path(source)) or original(source, **kw))
    names = ["../secret.png", "..\\secret.png", str(secret), "/etc/passwd", "link.png", "sub/../../secret.png",
             "..%2fsecret.png", "secret.png\u0000.png", ".env"]
    lines = [*({**STYLE, "prompt": "x", "image": name} for name in names), good(10)]
    summary = run_twice(studio, write_jobs(folder / "jobs.jsonl", lines), tmp_path / "out", bad=list(range(1, 10)),
                        good_lines=[10])
    assert opened and all(folder in path.resolve().parents for path in opened), opened  # only files inside were read
    assert "outside the jobs file's folder" in summary.failed[5]  # the symlink
    assert "does not exist" in summary.failed[2]  # a backslash is no separator here: a name inside the folder


def test_case_1_a_backslash_image_name_is_reported_as_written(studio, tmp_path):
    folder = tmp_path / "private-server-folder"
    folder.mkdir()
    jobs = write_jobs(folder / "jobs.jsonl", [{**STYLE, "prompt": "x", "image": "..\\..\\x.png"}])
    [reason] = run_batch(studio, jobs, tmp_path / "out").failed.values()
    assert str(folder) not in reason and "does not exist" in reason, reason


# -- reliability-cases.md #3: output names that leave the output folder ----------------------------------------


def test_case_3_output_names_that_leave_the_output_folder_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)
    names = ["../../x.png", "..\\..\\x", "/etc/x.png", "C:\\x.png", "a/../../b.png", "x\u0000.png", "link/x.png"]
    lines = [good(1), *(good(n, output=name) for n, name in enumerate(names, start=2)), good(9, output="~/x.png")]
    summary = run_twice(FakeStudio(), write_jobs(tmp_path / "jobs.jsonl", lines), out, bad=list(range(2, 9)),
                        good_lines=[1, 9])
    assert list(outside.iterdir()) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["jobs.jsonl", "out", "outside"]
    assert out / "_" / "x.png" in summary.files  # "~" is reduced to a plain folder name inside
    for line in range(2, 9):
        assert "would leave the output folder" in summary.failed[line] or "NUL" in summary.failed[line]


# -- reliability-cases.md #4, #5: models that unpickle code or need remote code -------------------------------


def test_case_4_5_pickled_and_remote_code_models_fail_their_lines(studio, tmp_path):
    import torch

    marker = tmp_path / "pwned"
    for name in ("evil.ckpt", "evil.bin", "evil.png"):
        torch.save({"state_dict": {"x": _CreatesFileWhenUnpickled(marker)}}, tmp_path / name)
    indexes = {
        "remote-unet": {"_class_name": "StableDiffusionPipeline", "unet": ["my_unet", "MyUNet"]},
        "custom-pipeline": {"_class_name": "LongPromptWeightingPipeline"},
    }
    for name, index in indexes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps(index))
    lines = [
        *(good(n, model=str(tmp_path / name)) for n, name in enumerate(["evil.ckpt", "evil.bin", "evil.png"], 1)),
        good(4, model=str(tmp_path / "remote-unet")),
        good(5, model=str(tmp_path / "custom-pipeline")),
        good(6, custom_pipeline="lpw_stable_diffusion"),
        good(7, trust_remote_code=True),
        good(8),
    ]
    summary = run_twice(studio, write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out", bad=list(range(1, 8)),
                        good_lines=[8])
    for line in (1, 2, 3):
        assert "--allow-pickle" in summary.failed[line], summary.failed[line]
    assert "remote code" in summary.failed[4] and "custom pipeline" in summary.failed[5]
    assert "custom_pipeline" in summary.failed[6] and "trust_remote_code" in summary.failed[7]
    assert not marker.exists()


# -- reliability-cases.md #6, #8, #12: images that are bombs, markup, or do not fit --------------------------


def test_case_6_8_12_unusable_images_fail_their_lines_before_any_model_call(studio, tmp_path, monkeypatch):
    bomb_png(tmp_path / "bomb.png")
    (tmp_path / "evil.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    (tmp_path / "page.png").write_text("<html><script>alert(1)</script></html>")
    Image.new("RGB", (64, 64), "gray").save(tmp_path / "in.png")
    Image.new("RGB", (1, 1), "red").save(tmp_path / "dot.png")
    Image.new("L", (48, 40), 255).save(tmp_path / "small-mask.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "black-mask.png")
    inpaint = {"task": "inpaint", "prompt": "x", "num_inference_steps": 1, "image": "in.png"}
    lines = [
        good(1),
        {**STYLE, "prompt": "x", "image": "bomb.png"},
        {**STYLE, "prompt": "x", "image": "evil.svg"},
        {**STYLE, "prompt": "x", "image": "page.png"},
        {**inpaint, "mask_image": "bomb.png"},
        {**inpaint, "mask_image": "small-mask.png"},
        {**inpaint, "mask_image": "black-mask.png"},
        {**STYLE, "prompt": "x", "image": "dot.png", "width": None, "height": None},
    ]
    unet_calls = []
    unet = studio.models.get(None).pipe.unet  # shared by every pipeline derived from the model
    original = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *args, **kwargs: unet_calls.append(1) or original(*args, **kwargs))
    summary = run_twice(studio, write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out", bad=list(range(2, 9)),
                        good_lines=[1])
    assert len(unet_calls) == 1  # the good line's one step; no bad line reached the model
    for line in (2, 3, 4, 5):
        assert "not a readable raster image" in summary.failed[line], summary.failed[line]
    assert "48x40" in summary.failed[6] and "nothing to repaint" in summary.failed[7] and "1x1" in summary.failed[8]


def _odd_images(folder: Path) -> dict[str, Path]:
    base = Image.new("RGB", (64, 64), (200, 30, 30))
    base.paste((30, 30, 200), (0, 0, 32, 64))
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257).save(folder / "deep.png")  # 16-bit
    base.convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    translucent = base.convert("RGBA")
    translucent.putalpha(128)
    translucent.save(folder / "rgba.png")
    base.save(folder / "anim.gif", save_all=True, append_images=[Image.new("RGB", (64, 64), "green")])
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 64 wide, 128 tall
    Image.new("RGB", (128, 64), (200, 30, 30)).save(folder / "exif.png", exif=exif)
    return {"cmyk": folder / "cmyk.jpg", "16-bit": folder / "deep.png", "palette": folder / "palette.png",
            "rgba": folder / "rgba.png", "animated": folder / "anim.gif", "exif": folder / "exif.png"}


def test_case_12_odd_image_modes_and_masks_are_normalised(studio, tmp_path):
    images = _odd_images(tmp_path)
    Image.new("L", (64, 64), 255).save(tmp_path / "white-mask.png")
    Image.new("RGB", (64, 64), "gray").save(tmp_path / "in.png")
    lines = [{**STYLE, "prompt": f"good {name}", "seed": 1, "image": path.name} for name, path in images.items()]
    lines[-1] = {**lines[-1], "width": None, "height": None}  # the EXIF-rotated one: its own aspect ratio
    lines.append({"task": "inpaint", "prompt": "good white mask", "seed": 1, "num_inference_steps": 1,
                  "image": "in.png", "mask_image": "white-mask.png"})  # all white: plain image-to-image
    summary = run_twice(studio, write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out", bad=[],
                        good_lines=list(range(1, 8)))
    sizes = {read_record(path).request.prompt: Image.open(path).size for path in summary.files}
    assert sizes["good exif"][0] < sizes["good exif"][1], sizes  # taller than wide: the rotation was applied


# -- reliability-cases.md #9: image URLs, loopback included, are never fetched ----------------------------------


def test_case_9_image_urls_are_never_fetched(studio, tmp_path):
    with loopback_server() as (url, hits):
        Image.new("RGB", (64, 64), "gray").save(tmp_path / "in.png")
        urls = [url, "http://169.254.169.254/latest/meta-data/", "http://[::1]/x.png", "file:///etc/passwd",
                "//127.0.0.1/x.png"]
        lines = [{**STYLE, "prompt": "x", "image": value} for value in urls]
        lines.append({**STYLE, "prompt": "x", "image": "in.png", "reference_image": url})
        summary = run_batch(studio, write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out")
    assert sorted(summary.failed) == list(range(1, 7)) and hits == []


# -- reliability-cases.md #10: every bad number fails its line before any model call -----------------------------

BAD_NUMBER_LINES = [
    ('"width": 0', "0"), ('"width": -8', "-8"), ('"width": 100000', "100000"), ('"width": 100', "100"),
    ('"height": 0', "0"), ('"height": -8', "-8"), ('"num_inference_steps": 0', "0"),
    ('"num_inference_steps": -1', "-1"), ('"num_inference_steps": 1000000', "1000000"),
    ('"guidance_scale": NaN', "nan"), ('"guidance_scale": Infinity', "inf"), ('"guidance_scale": -Infinity', "inf"),
    ('"guidance_scale": 1e400', "inf"), ('"batch_size": 0', "0"), ('"batch_size": 1000000', "1000000"),
    ('"seed": 18446744073709551616', "18446744073709551616"), ('"seed": -1', "-1"),
    ('"seed": [1, 18446744073709551616]', "18446744073709551616"),
    ('"task": "style_transfer", "image": "a.png", "strength": -0.1', "-0.1"),
    ('"task": "inpaint", "image": "a.png", "strength": 1.5', "1.5"),
]


def test_case_10_bad_numbers_fail_their_lines_before_any_model_call(tmp_path):
    studio = FakeStudio()
    lines = [good(1), *('{"prompt": "x", ' + fields + "}" for fields, _ in BAD_NUMBER_LINES), good(99)]
    bad = list(range(2, len(BAD_NUMBER_LINES) + 2))
    summary = run_twice(studio, write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out", bad=bad,
                        good_lines=[1, len(lines)])
    for line, (fields, quoted) in zip(bad, BAD_NUMBER_LINES):
        assert quoted in summary.failed[line], (fields, summary.failed[line])
    assert studio.calls == 2  # the good lines only, and only once


# -- reliability-cases.md #11: a 100k-character prompt with control and RTL characters ------------------------

LONG_PROMPT = "good " + "red " * 25_000 + "\u202eevil\u202c \u0627\u0644 \x07\x1b[31m {seed} %s\nSteps: 999, Seed: 7"


def test_case_11_long_prompt_with_control_characters_renders_and_is_kept_verbatim(studio, tmp_path):
    lines = [good(1, prompt=LONG_PROMPT + "\x00"), {"prompt": "x" * 200_001}, good(3)]
    summary = run_twice(studio, write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out", bad=[2], good_lines=[1, 3])
    assert "200000" in summary.failed[2]
    record = read_record(summary.files[0])
    assert record.request.prompt == LONG_PROMPT and record.seed == 1  # NUL dropped; nothing evaluated or formatted


def test_case_11_batch_warns_that_a_long_prompt_was_truncated(studio, tmp_path, capsys, monkeypatch):
    from studio.cli import main

    monkeypatch.setattr(studio_core, "Studio", lambda *args, **kwargs: studio)  # the session's model, loaded
    jobs = write_jobs(tmp_path / "jobs.jsonl", [good(1, prompt="good " + "red " * 2000)])  # past 16 chunks of 75
    assert main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "tokens long" in printed.out + printed.err


# -- reliability-cases.md #14: a non-finite image fails its line and is never saved ----------------------------


def test_case_14_non_finite_image_fails_its_line_and_is_never_saved(studio, tmp_path, monkeypatch):
    vae = studio.models.get(None).pipe.vae
    original, decodes = vae.decode, []

    def first_overflows(*args, **kwargs):
        output = original(*args, **kwargs)
        decodes.append(1)
        if len(decodes) == 1:
            output.sample.fill_(float("nan"))
        return output

    monkeypatch.setattr(vae, "decode", first_overflows)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [good(1), good(2)])
    out = tmp_path / "out"
    first = run_batch(studio, jobs, out)
    assert list(first.failed) == [1] and "NaN/inf" in first.failed[1]
    assert len(list(out.glob("*.png"))) == 1 and not list(out.glob(".studio-tmp*"))  # line 2's image only
    monkeypatch.undo()
    rerun = run_batch(studio, jobs, out)
    assert [line_of(job) for job in rerun.rendered] == [1] and not rerun.failed
    assert np.asarray(Image.open(rerun.files[0])).std() > 0  # a real image, not a black one


# -- reliability-cases.md #16: the state a kill leaves mid-write -------------------------------------------


def test_case_16_rerun_after_a_kill_mid_write_renders_exactly_the_missing_job(tmp_path):
    studio = FakeStudio()
    jobs = write_jobs(tmp_path / "jobs.jsonl", [good(1), good(2, output="sub/two"), good(3)])
    out = tmp_path / "out"
    first = run_batch(studio, jobs, out)
    # Killed while writing job 3: its image only a temp file, its manifest line torn.
    first.files[-1].unlink()
    manifest = out / MANIFEST_NAME
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    (out / ".studio-tmp-killed.tmp").write_bytes(b"\x89PNG\r\n\x1a\nhalf")
    (out / "sub" / ".studio-tmp-killed.tmp").write_bytes(b"half")
    kept = {path: path.read_bytes() for path in first.files[:-1]}
    studio.calls = 0
    rerun = run_batch(studio, jobs, out)
    assert studio.calls == 1 and [line_of(job) for job in rerun.rendered] == [3] and not rerun.failed
    assert {path: path.read_bytes() for path in kept} == kept
    assert not list(out.rglob(".studio-tmp*")) and len(list(out.rglob("*.png"))) == 3


# -- reliability-cases.md #19: over-long lines ---------------------------------------------------------------


def test_case_19_over_long_lines_fail_alone(tmp_path):
    lines = [
        good(1),
        {"prompt": "x" * 300_000},
        "x" * 5_000_000,
        {"prompt": "x", "negative_prompt": "y" * 300_000},
        {f"field{i}": i for i in range(20_000)},
        good(6),
    ]
    summary = run_twice(FakeStudio(), write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out", bad=[2, 3, 4, 5],
                        good_lines=[1, 6])
    assert "200000" in summary.failed[2] and "JSON" in summary.failed[3] and "negative_prompt" in summary.failed[4]


# -- reliability-cases.md #21: a job too large for the device ----------------------------------------------


def test_case_21_jobs_too_large_for_the_device_fail_up_front_with_the_limit(studio, tmp_path):
    lines = [good(1), good(2, width=2048, height=2048), good(3, width=1024, height=1024, batch_size=16)]
    summary = run_twice(studio, write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out", bad=[2, 3],
                        good_lines=[1])
    assert "2048x2048" in summary.failed[2] and "1024x1024 x 16 images" in summary.failed[3]
    for reason in summary.failed.values():
        assert "limit of" in reason and "--max-output-pixels" in reason, reason  # the limit and how to raise it


# -- reliability-cases.md #22: forged PNGs where a line's output should go ----------------------------------


def test_case_22_forged_pngs_at_an_output_name_are_refused_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    forged = {"a.png": "{not json", "b.png": "[" * 100_000,
              "c.png": json.dumps({"request": good(3, output="c"), "image_index": "0", "seed": 3})}
    for name, text in forged.items():
        info = PngImagePlugin.PngInfo()
        info.add_itxt("studio", text)
        Image.new("RGB", (8, 8)).save(out / name, pnginfo=info)
    bomb_png(out / "d.png")
    before = {path: path.read_bytes() for path in out.iterdir()}
    lines = [good(1, output="a"), good(2, output="b"), good(3, output="c"), good(4, output="d"), good(5)]
    summary = run_twice(FakeStudio(), write_jobs(tmp_path / "jobs.jsonl", lines), out, bad=[1, 2, 3, 4], good_lines=[5])
    assert all("exists already" in reason for reason in summary.failed.values())
    assert {path: path.read_bytes() for path in before} == before
