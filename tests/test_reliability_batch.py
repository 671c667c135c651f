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
