"""Batch rendering: bad lines, paths that leave the folder, CSV, and resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from studio.batch import MANIFEST_NAME, read_jobs, run_batch
from studio.metadata import read_record


def write_jobs(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_bad_lines_are_reported_by_number_and_others_run(studio, tmp_path):
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        [
            {"prompt": "a red circle", "seed": 1, "num_inference_steps": 2},
            "{not json",
            {"prompt": "x", "width": 100},
            {"prompt": "y", "task": "inpaint", "image": "../../etc/passwd"},
            {"prompt": "z", "output": "../../escape.png", "num_inference_steps": 1},
            {"prompt": "a blue square", "seed": 2, "num_inference_steps": 2, "output": "named/blue"},
        ],
    )
    out = tmp_path / "out"
    summary = run_batch(studio, jobs, out)
    assert sorted(summary.failed) == [2, 3, 4, 5]
    assert "JSON" in summary.failed[2] and "100" in summary.failed[3]
    assert "outside" in summary.failed[4] and "escape.png" in summary.failed[5]
    assert len(summary.rendered) == 2
    assert (out / "named" / "blue.png").is_file()
    assert not (tmp_path / "escape.png").exists()
    # Each PNG's metadata holds the request of its line.
    prompts = {read_record(path).request.prompt for path in summary.files}
    assert prompts == {"a red circle", "a blue square"}


def test_csv_jobs_are_typed(tmp_path):
    jobs = tmp_path / "jobs.csv"
    jobs.write_text('prompt,seed,guidance_scale,scheduler\n"a cat, sitting",3,4.5,euler_a\nbad,,x,\n')
    parsed = read_jobs(jobs, max_jobs=10)
    assert parsed[0].request.prompt == "a cat, sitting" and parsed[0].request.seed == 3
    assert parsed[0].request.guidance_scale == 4.5 and parsed[0].request.scheduler == "euler_a"
    assert parsed[1].line == 3 and "guidance_scale" in parsed[1].error


def test_rerun_renders_nothing_twice(studio, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "a", "num_inference_steps": 1, "batch_size": 2}])
    out = tmp_path / "out"
    first = run_batch(studio, jobs, out)
    mtimes = {p: p.stat().st_mtime_ns for p in first.files}
    second = run_batch(studio, jobs, out)
    assert second.rendered == [] and second.skipped == first.rendered
    assert {p: p.stat().st_mtime_ns for p in first.files} == mtimes


def test_resume_after_sigkill(sd15_folder, tmp_path):
    """Kill the batch mid-job: finished files stay intact, no partial file, exactly the missing jobs render."""
    lines = [{"prompt": f"job {i}", "seed": i, "num_inference_steps": 40} for i in range(4)]
    jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "studio.cli", "batch", str(jobs), "--out", str(out), "--model", str(sd15_folder), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # tiny model: one thread, no spin-waiting
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / MANIFEST_NAME
    deadline = time.time() + 120
    while time.time() < deadline and not (manifest.is_file() and manifest.read_text().count('"done"') >= 1):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p: p.read_bytes() for p in out.glob("*.png")}
    assert 1 <= len(finished) < 4, "the kill should land after the first job and before the last"
    for path in finished:
        Image.open(path).verify()  # complete PNGs only

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{4 - len(finished)} rendered, {len(finished)} already done, 0 failed" in rerun.stdout
    assert {p: p.read_bytes() for p in finished} == finished  # finished files untouched
    assert len(list(out.glob("*.png"))) == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".studio-tmp")]
    seeds = sorted(read_record(p).seed for p in out.glob("*.png"))
    assert seeds == [0, 1, 2, 3]
