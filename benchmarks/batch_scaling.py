"""Images per second of `studio batch --engine ray` with 1 and 2 CPU workers, in the same run.

One local Ray cluster (`ray.init(num_cpus=N)`, timed: Ray's own start-up), then the same jobs file
(the embedded model, 64x64, its recommended 20 steps, seeds given) rendered into a fresh folder with
1 worker, then with 2 workers (each worker: 1 CPU, 1 torch thread). For each: the pool's start-up
(actors placed, the studio imported, the model loaded; the model load also alone), images per second
from the first job sent to the last PNG written, and once every worker was ready (a worker renders as
soon as its own model is loaded, so the first seconds run on fewer workers). The single-process batch
(`run_batch` in this process, 1 torch thread like each worker) is timed on the same jobs as the baseline.

    python benchmarks/batch_scaling.py [--jobs 32] [--steps 20] [--cpus 2]

Figures on a shared machine move with whatever else runs: say so beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python benchmarks/batch_scaling.py` from a checkout
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    import torch

    from studio import Settings, Studio
    from studio.batch import run_batch
    from studio.cluster import ClusterOptions, run_cluster_batch
    from studio.console import quiet_libraries

    quiet_libraries()
    folder = Path(tempfile.mkdtemp(prefix="studio-batch-scaling-"))
    jobs = folder / "jobs.jsonl"
    lines = [{"prompt": f"a red circle {n}", "seed": n, "num_inference_steps": args.steps} for n in range(args.jobs)]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))

    # 1. Ray's own start-up: a local cluster of args.cpus CPUs
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray_init = time.perf_counter() - started
    print(f"ray.init(num_cpus={args.cpus}): {ray_init:.2f} s")
    rows = []
    try:
        # 2. the same jobs with 1 worker, then 2 (same run, same cluster)
        for workers in (1, 2):
            started = time.perf_counter()
            summary = run_cluster_batch(Settings(), jobs, folder / f"ray-{workers}", ClusterOptions(workers=workers))
            total = time.perf_counter() - started
            assert len(summary.rendered) == args.jobs and not summary.failed, summary.failed
            assert summary.workers == workers, f"only {summary.workers} of {workers} workers started"
            rows.append(
                (f"ray, {workers} worker{'s' if workers > 1 else ''}", summary.images_per_second,
                 summary.steady_images_per_second, summary.startup_seconds, summary.model_load_seconds, total)
            )
    finally:
        ray.shutdown()

    # 3. the single-process batch on the same jobs, in this process
    torch.set_num_threads(1)
    studio = Studio(Settings())
    started = time.perf_counter()
    studio.models.get(None)
    load = time.perf_counter() - started
    begun = time.perf_counter()
    run_batch(studio, jobs, folder / "local")
    render = time.perf_counter() - begun
    rate = args.jobs / render
    rows.append(("single process, 1 thread", rate, rate, load, load, time.perf_counter() - started))

    print(f"{args.jobs} jobs, embedded model, 64x64, {args.steps} steps, {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'engine':<26} {'images/s':>9} {'all ready':>10} {'start-up s':>11} {'model load s':>13} {'wall s':>7}")
    for name, rate, steady, startup, load, total in rows:
        print(f"{name:<26} {rate:>9.2f} {steady:>10.2f} {startup:>11.2f} {load:>13.2f} {total:>7.2f}")
    one, two = rows[0], rows[1]
    print(f"2 workers / 1 worker: {two[1] / one[1]:.2f}x ({two[2] / one[2]:.2f}x once all were ready); Ray start-up: "
          f"ray.init {ray_init:.2f} s, then the pool {two[3] - two[4]:.2f} s besides the model load (2 workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
