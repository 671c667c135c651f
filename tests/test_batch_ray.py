"""`studio batch --engine ray`: a local Ray cluster of 2 CPU workers on the embedded model.

Each output exactly once with its own line's request; the same pixels as the single-process batch;
a worker SIGKILLed mid-batch, and a driver SIGKILLed and run again, still end with every job done once;
a bad line fails alone.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray  # in the test extra: CI runs these, nothing skipped
import torch
from PIL import Image

from studio import Settings, Studio
from studio.batch import MANIFEST_NAME, read_jobs, read_manifest, run_batch
from studio.cluster import WORKER_NAME_PREFIX, ClusterOptions, run_cluster_batch
from studio.metadata import read_record

TWO_WORKERS = ClusterOptions(workers=2, cpus_per_worker=1)


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module: 2 CPUs, no dashboard; workers run offline (the engine sets that)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def write_jobs(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def eight_jobs(steps: int = 4) -> list[dict]:
    """Eight lines: seeds given, one seed left to the job's identity, one line making two images."""
    lines = [{"prompt": f"a red circle {n}", "seed": 100 + n, "num_inference_steps": steps} for n in range(6)]
    lines.append({"prompt": "a blue square, no seed", "num_inference_steps": steps})
    lines.append({"prompt": "two green triangles", "seed": 7, "batch_size": 2, "num_inference_steps": steps,
                  "output": "pairs/green"})
    return lines


def pngs(out: Path) -> list[Path]:
    return sorted(path for path in out.rglob("*.png"))


def done_entries(out: Path) -> list[dict]:
    lines = (out / MANIFEST_NAME).read_text().splitlines() if (out / MANIFEST_NAME).is_file() else []
    return [entry for entry in map(json.loads, lines) if entry["state"] == "done"]


def assert_each_job_once(jobs_path: Path, out: Path) -> None:
    """Every job done, each file once and holding its own line's request; no temp file left."""
    jobs = read_jobs(jobs_path, max_jobs=100)
    manifest = read_manifest(out / MANIFEST_NAME)
    expected = []
    for job in jobs:
        assert manifest[job.job_id]["state"] == "done", manifest[job.job_id]
        files = manifest[job.job_id]["files"]
        expected += files
        for index, name in enumerate(files):
            record = read_record(out / name)
            assert record.request.prompt == job.request.prompt and record.image_index == index
            Image.open(out / name).verify()  # complete PNGs only
    assert sorted(str(path.relative_to(out)) for path in pngs(out)) == sorted(expected)
    assert len(set(expected)) == len(expected) == sum(job.request.batch_size for job in jobs)
    assert not [path for path in out.rglob(".studio-tmp*")]


@pytest.fixture(scope="module")
def eight_rendered(cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eight")
    jobs = write_jobs(folder / "jobs.jsonl", eight_jobs())
    summary = run_cluster_batch(Settings(), jobs, folder / "out", TWO_WORKERS)
    return jobs, folder / "out", summary


def test_eight_jobs_render_each_output_exactly_once(eight_rendered):
    jobs, out, summary = eight_rendered
    # Two workers started; each renders as soon as its model is loaded, so a fast one may take every job.
    assert 1 <= summary.workers <= 2 and len(set(summary.worker_pids)) == summary.workers
    assert os.getpid() not in summary.worker_pids
    assert len(summary.rendered) == 8 and not summary.failed and summary.images == 9
    assert_each_job_once(jobs, out)
    # The seed a line left unset comes from its job id, as in the single-process batch.
    unseeded = read_record(next(out.glob("00007-*.png")))
    assert unseeded.seed == int(read_jobs(jobs, 100)[6].job_id[-8:], 16)

    rerun = run_cluster_batch(Settings(), jobs, out, TWO_WORKERS)  # nothing left: Ray is not even asked
    assert rerun.rendered == [] and len(rerun.skipped) == 8 and rerun.workers == 0


def test_same_pixels_as_the_single_process_batch(eight_rendered, tmp_path):
    jobs, out, _ = eight_rendered
    # One thread, as each worker of one CPU runs: float sums split over threads may move a pixel by 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_batch(Studio(Settings()), jobs, tmp_path / "local")
    finally:
        torch.set_num_threads(threads)
    assert len(local.files) == 9
    for path in local.files:
        from_ray = out / path.relative_to(tmp_path / "local")
        assert read_record(from_ray).seed == read_record(path).seed
        assert np.array_equal(np.asarray(Image.open(from_ray)), np.asarray(Image.open(path))), path.name
    # and the images differ from one another: the comparison can fail
    first, second = (np.asarray(Image.open(path), dtype=int) for path in local.files[:2])
    assert np.abs(first - second).sum() > 0


def busy_worker_pid(deadline: float) -> int | None:
    """The PID of one of this cluster's studio workers while it renders a job, asked through Ray."""
    while time.time() < deadline:
        for name in ray.util.list_named_actors():
            if not name.startswith(WORKER_NAME_PREFIX):
                continue
            try:
                status = ray.get(ray.get_actor(name).status.remote(), timeout=30)
            except (ValueError, ray.exceptions.RayError):  # a worker of an earlier test, gone
                continue
            if status["job"] is not None:
                return status["pid"]
        time.sleep(0.02)
    return None


def test_worker_killed_mid_batch_still_renders_every_job_once(cluster, tmp_path):
    lines = [{"prompt": f"job {n}", "seed": n, "num_inference_steps": 20} for n in range(8)]
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out"
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.update(summary=run_cluster_batch(Settings(), jobs, out, TWO_WORKERS)))
    driver.start()
    deadline = time.time() + 90
    while time.time() < deadline and not done_entries(out):
        time.sleep(0.02)
    victim = busy_worker_pid(deadline)
    done_at_kill = len(done_entries(out))
    os.kill(victim, signal.SIGKILL)
    driver.join(timeout=120)
    assert not driver.is_alive()

    summary = outcome["summary"]
    assert 1 <= done_at_kill < 8, "the kill should land after the first job and before the last"
    assert victim in summary.worker_pids and summary.retried == 1  # it died holding a job, which went on
    assert not summary.failed and len(summary.rendered) == 8
    assert_each_job_once(jobs, out)
    assert len(done_entries(out)) == 8  # one manifest line per job: no job recorded twice


def test_driver_killed_and_rerun_renders_exactly_the_missing_jobs(cluster, tmp_path):
    lines = [{"prompt": f"job {n}", "seed": n, "num_inference_steps": 25} for n in range(8)]
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out"
    command = [sys.executable, "-m", "studio.cli", "batch", str(jobs), "--out", str(out), "--engine", "ray",
               "--address", cluster, "--workers", "1", "--quiet"]  # one worker: start-up dominates on 2 cores
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and driver.poll() is None and not pngs(out):
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = {path: path.read_bytes() for path in pngs(out)}
    assert 1 <= len(finished) < 8, "the kill should land after the first output and before the last"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{8 - len(finished)} rendered, {len(finished)} already done, 0 failed" in rerun.stdout
    assert {path: path.read_bytes() for path in finished} == finished  # finished files untouched
    assert_each_job_once(jobs, out)


@pytest.mark.parametrize("write_from_workers", [False, True], ids=["driver-writes", "workers-write"])
def test_a_bad_line_fails_alone(cluster, tmp_path, write_from_workers):
    lines = [
        {"prompt": "good 1", "seed": 1, "num_inference_steps": 2},
        "{not json",
        {"prompt": "too wide", "width": 100},
        {"prompt": "missing image", "task": "inpaint", "image": "photos/nowhere.png", "mask_image": "photos/nowhere.png",
         "num_inference_steps": 2},
        {"prompt": "good 2", "seed": 2, "num_inference_steps": 2, "output": "named/two"},
    ]
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out"
    options = ClusterOptions(workers=1, write_from_workers=write_from_workers)
    summary = run_cluster_batch(Settings(), jobs, out, options)
    assert sorted(summary.failed) == [2, 3, 4], summary.failed
    assert "JSON" in summary.failed[2] and "100" in summary.failed[3]
    # Found by the worker (the file is opened there); quoted as the line wrote it, not as a server path.
    assert "photos/nowhere.png" in summary.failed[4] and str(tmp_path) not in summary.failed[4]
    names = sorted(str(path.relative_to(out)) for path in pngs(out))
    assert len(names) == 2 and names[0].startswith("00001-") and names[1] == "named/two.png"
    prompts = {read_record(path).request.prompt for path in pngs(out)}
    assert prompts == {"good 1", "good 2"}
    failed = [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]
    assert sorted(entry["line"] for entry in failed if entry["state"] == "failed") == [2, 3, 4]


def test_ray_flags_need_the_ray_engine_and_gpus_the_cluster_has(cluster, tmp_path, capsys):
    from studio.cli import EXIT_BAD_INPUT, main
    from studio.requests import StudioInputError

    jobs, out = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "a", "num_inference_steps": 1}]), tmp_path / "out"
    assert main(["batch", str(jobs), "--out", str(out), "--workers", "2"]) == EXIT_BAD_INPUT
    assert "--workers is a Ray option: add --engine ray" in capsys.readouterr().err
    with pytest.raises(StudioInputError, match="has 0 GPUs"):
        run_cluster_batch(Settings(), jobs, out, ClusterOptions(gpus_per_worker=1))
    assert not pngs(out)
