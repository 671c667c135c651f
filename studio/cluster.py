"""Batches on every GPU of a machine, or of a Ray cluster: `studio batch JOBS --out DIR --engine ray`.

The driver (this process) reads the jobs file, decides each job's identity, files and seed exactly as
`run_batch` does (studio/batch.py: one code for both engines), and keeps the manifest: it is its only
writer. A pool of Ray actors, each loading the model once, renders the jobs as they come, one job in
flight per actor. By default a worker returns the PNG bytes (metadata in them) and the driver writes
them into DIR; with `write_from_workers` the workers write into DIR themselves (a shared path).

Ray restarts a worker that dies, and the driver hands the job it held to the next free worker (at least
once; a job under which MAX_ATTEMPTS workers died fails). Outputs are idempotent: a job's files are named
by its identity, written atomically, never replaced; a file already holding the job's own image counts as
written. Killing a worker costs its job's progress and a model load in the background; killing the driver
and running the same command again renders exactly the jobs not done.

One machine with several GPUs is the same code path on a local cluster (`--address local`, or no
address and no RAY_ADDRESS). Ray is imported only inside the functions that use it.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from .batch import BatchSummary, Job, JobPlan, failure_reason, plan_job, start_batch, write_job_files
from .progress import Progress
from .requests import StudioInputError

WORKER_NAME_PREFIX = "studio-render-"  # named actors: tests and operators find a worker's PID through Ray
MAX_ATTEMPTS = 4  # a job whose worker dies this many times under it fails (a job that kills any worker)
# What every worker needs whatever the node's environment: never reach for a hub.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass(frozen=True)
class ClusterOptions:
    """How the Ray engine runs; every field has the flag of the same name (`studio batch --engine ray`)."""

    address: str | None = None  # None: RAY_ADDRESS, else a new local cluster; "local", "auto", "ray://host:port"
    workers: int | None = None  # None: one per GPU (or per cpus_per_worker CPUs on a cluster without GPUs)
    gpus_per_worker: float | None = None  # None: 1 where the cluster has GPUs, else 0 (CPU workers)
    cpus_per_worker: float = 1.0
    write_from_workers: bool = False  # workers write into the output folder (a path every node shares)


@dataclass
class ClusterSummary(BatchSummary):
    workers: int = 0  # workers that started and rendered (0: nothing to render, Ray not started)
    images: int = 0  # images rendered by this run
    startup_seconds: float = 0.0  # Ray connected or started, every worker placed and its model loaded
    model_load_seconds: float = 0.0  # of that, the slowest worker's model load
    render_seconds: float = 0.0  # from the first job sent to the last result written
    worker_pids: list[int] = field(default_factory=list)  # each worker process that became ready, restarts too
    retried: int = 0  # jobs handed to another worker after theirs died under them

    # Once every worker of the pool was ready: images rendered and seconds (throughput without the ramp-up)
    steady_images: int = 0
    steady_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.render_seconds if self.render_seconds > 0 else 0.0

    @property
    def steady_images_per_second(self) -> float:
        return self.steady_images / self.steady_seconds if self.steady_seconds > 0 else 0.0


class RenderWorker:
    """One Ray actor: builds its own Studio from the driver's settings, loads the model once, renders jobs."""

    def __init__(self, settings, tasks, threads: int, working_dir: str):
        import torch

        from .console import quiet_libraries
        from .core import Studio

        torch.set_num_threads(threads)  # workers sharing a node's cores: more threads only fight
        if os.path.isdir(working_dir):
            os.chdir(working_dir)  # relative model and file paths mean what they mean to the driver
        quiet_libraries()
        self.studio = Studio(settings, tasks)
        self._current = None  # the job id being rendered

    def ready(self) -> tuple[int, float, str | None]:
        """Load the default model now: (pid, seconds, why it failed). A model that fails to load fails each
        job with the reason instead, as in the single-process batch."""
        started = time.perf_counter()
        try:
            self.studio.models.get(None)
        except Exception as error:
            return os.getpid(), time.perf_counter() - started, f"{type(error).__name__}: {error}"
        return os.getpid(), time.perf_counter() - started, None

    def status(self) -> dict:
        """This worker's process and the job it is rendering (None: idle); answers while a job renders."""
        return {"pid": os.getpid(), "job": self._current}

    def render(self, job_data: dict, root: str) -> dict:
        """The driver writes: the job's PNG bytes and warnings, or {"error": reason}."""
        job = self._job(job_data)
        try:
            result = self.studio.run(job.request, Progress())
            return {"pngs": [result.png(index) for index in range(len(result.images))], "warnings": result.warnings}
        except Exception as error:  # one job's failure; a cancel cannot reach a worker, a time limit fails the job
            return {"error": failure_reason(error, job, Path(root))}
        finally:
            self._current = None

    def render_and_write(self, job_data: dict, root: str) -> dict:
        """The worker writes into the shared output folder; planned again here, so that a retried task finds
        the files its first try wrote and writes nothing twice."""
        job = self._job(job_data)
        try:
            plan = plan_job(job, Path(root))
            if plan.written:
                return {"rendered": False, "warnings": []}
            result = self.studio.run(plan.request, Progress())
            write_job_files(plan, [result.png(index) for index in range(len(result.images))], Path(root))
            return {"rendered": True, "warnings": result.warnings}
        except Exception as error:
            return {"error": failure_reason(error, job, Path(root))}
        finally:
            self._current = None

    def _job(self, job_data: dict) -> Job:
        self._current = job_data["job"]
        request = self.studio.tasks.parse_request(job_data["request"])
        return Job(job_data["line"], job_data["job"], request, written=job_data["written"])


def _job_data(job: Job, plan: JobPlan) -> dict:
    """A job as plain data for its worker: the request as the line set it (seed included), parsed again there.
    Plain data, not pickled request objects: a worker reads it with its own request classes."""
    request = {**plan.request.model_dump(mode="json", exclude_unset=True), "task": plan.request.task}
    return {"line": job.line, "job": job.job_id, "request": request, "written": job.written}


def run_cluster_batch(
    settings,
    jobs_path: Path,
    out_dir: Path,
    options: ClusterOptions | None = None,
    tasks=None,
    on_job=None,
    show_progress: bool = False,
    allowed_models: set[str] | None = None,
) -> ClusterSummary:
    """Render every job not already done into out_dir on a pool of Ray actors; `on_job` as in run_batch.

    Connects to (or starts) Ray only when some job needs rendering, and shuts down only a Ray it started.
    """
    options = options or ClusterOptions()
    # 1. the jobs, their identities and files, the manifest: exactly what the single-process batch reads
    jobs, record = start_batch(jobs_path, out_dir, settings.max_batch_lines, allowed_models, tasks, on_job)
    record.summary = ClusterSummary()
    to_render: list[tuple[Job, JobPlan]] = []
    for job in jobs:
        if record.settled(job):
            continue
        try:
            plan = plan_job(job, record.root)
        except Exception as error:  # an output name taken by another file: this job's failure
            record.failed(job, failure_reason(error, job, record.root))
            continue
        if plan.written:  # a driver killed after writing the files, before its manifest line
            record.done(job, plan.paths, False, [])
            continue
        to_render.append((job, plan))
    if not to_render:
        return record.summary

    # 2. Ray and the worker pool (the bar says so: starting takes seconds, the model load included)
    from tqdm.auto import tqdm

    ray = _import_ray()
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(to_render), unit="job", disable=not show_progress,
               dynamic_ncols=True, desc="starting Ray workers")
    started = time.perf_counter()
    started_ray, pool = _connect(ray, options.address), []
    try:
        pool = _start_workers(ray, settings, tasks, options, len(to_render))
        # 3. jobs to workers as each is ready and idle, results written and recorded as they come
        _render_all(ray, pool, to_render, record, options.write_from_workers, bar, started)
    finally:
        bar.close()
        for worker in pool:
            ray.kill(worker)
        if started_ray:
            ray.shutdown()
    return record.summary


def _import_ray():
    try:
        import ray
    except ImportError:
        raise StudioInputError("--engine ray needs Ray: pip install 'studio[cluster]'") from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one; True when this call started Ray."""
    if ray.is_initialized():  # the caller's own Ray (a notebook, the tests)
        return False
    options = {"logging_level": logging.WARNING}
    if not (address or "").startswith("ray://"):  # a Ray client passes what it is given on to the cluster's driver
        options["include_dashboard"] = False  # a local cluster started for the run: no dashboard to serve
    ray.init(address=address, **options)
    return True


def _start_workers(ray, settings, tasks, options: ClusterOptions, jobs: int) -> list:
    resources = ray.cluster_resources()
    gpus_there, cpus_there = resources.get("GPU", 0), resources.get("CPU", 0)
    gpus = options.gpus_per_worker
    if gpus is None:
        gpus = 1 if gpus_there and (settings.device == "auto" or settings.device.startswith("cuda")) else 0
    if gpus > gpus_there:
        raise StudioInputError(
            f"--gpus-per-worker {gpus:g}: the Ray cluster has {gpus_there:g} GPUs; pass --gpus-per-worker 0 for CPU workers"
        )
    if options.cpus_per_worker > cpus_there:
        raise StudioInputError(f"--cpus-per-worker {options.cpus_per_worker:g}: the Ray cluster has {cpus_there:g} CPUs")
    fit = int(gpus_there // gpus) if gpus else int(cpus_there // options.cpus_per_worker)
    count = max(1, min(options.workers or fit, jobs))
    if count > fit:
        logging.getLogger(__name__).warning(
            "%d Ray workers asked, %d fit in the cluster now: the others start when it has room", count, fit
        )
    if gpus == 0 and settings.device == "auto":
        settings = replace(settings, device="cpu")  # a worker without a GPU of its own must not take the node's
    elif gpus and settings.device.startswith("cuda:"):
        settings = replace(settings, device="cuda")  # Ray shows each worker its own GPUs only, from cuda:0
    if settings.model and settings.model != "embedded" and os.path.exists(settings.model):
        settings = replace(settings, model=os.path.abspath(settings.model))
    actor_class = ray.remote(RenderWorker)
    actor_options = dict(
        num_cpus=options.cpus_per_worker,
        num_gpus=gpus,
        max_restarts=-1,  # a worker that dies comes back (its model loaded again); the driver hands the
        max_task_retries=0,  # job it held to the next free worker rather than wait for that
        max_concurrency=2,  # one job at a time, and status() still answers while it renders
        runtime_env={"env_vars": {**WORKER_ENV, "OMP_NUM_THREADS": str(_threads(options.cpus_per_worker))}},
    )
    token = secrets.token_hex(4)
    return [
        actor_class.options(**actor_options, name=f"{WORKER_NAME_PREFIX}{token}-{index}").remote(
            settings, tasks, _threads(options.cpus_per_worker), os.getcwd()
        )
        for index in range(count)
    ]


def _threads(cpus: float) -> int:
    return max(1, int(cpus))


def _render_all(ray, pool, to_render, record, write_from_workers: bool, bar, started: float) -> None:
    """Keep every ready worker busy with one job; write (or check) and record each result as it arrives.

    A worker starts rendering as soon as its model is loaded, not when the whole pool is: a worker the
    cluster cannot place yet (more workers asked than fit) never holds the others up.
    """
    summary: ClusterSummary = record.summary
    root = str(record.root)
    waiting = deque(to_render)
    starting = {worker.ready.remote(): worker for worker in pool}  # ready() ref -> worker loading its model
    running: dict = {}  # result ref -> (job, plan, worker)
    attempts: dict[str, int] = {}  # job id -> workers that died under it
    joined: set[int] = set()  # the workers that were ready once (a restarted one counts once)
    idle: list = []  # ready workers that found no job left (a job a dead worker held may still come back)
    first_sent = all_ready = None
    images_then = 0

    def send(worker) -> None:
        nonlocal first_sent
        if not waiting:
            idle.append(worker)
            return
        job, plan = waiting.popleft()
        method = worker.render_and_write if write_from_workers else worker.render
        ref = method.remote(_job_data(job, plan), root)
        running[ref] = (job, plan, worker)
        first_sent = first_sent or time.perf_counter()

    while running or (starting and waiting):
        # Every reply ready now, not one per call: with many workers, one wait per result costs more than it saves.
        ready, others = ray.wait([*running, *starting], num_returns=1)
        if others:
            ready += ray.wait(others, num_returns=len(others), timeout=0)[0]
        finished = []
        for ref in ready:
            if ref in starting:
                _worker_ready(ray, ref, starting.pop(ref), summary, send, joined)
                if all_ready is None and not starting:  # the whole pool (restarts later do not count)
                    all_ready, images_then = time.perf_counter(), summary.images
                    summary.startup_seconds = all_ready - started
                bar.set_description_str(f"{summary.workers} workers")
            else:
                job, plan, worker = running.pop(ref)
                finished.append((job, plan, worker, _reply(ray, ref)))
        settled = []
        for job, plan, worker, reply in finished:
            if isinstance(reply, ray.exceptions.RayActorError):  # the worker died under the job (killed, OOM...)
                starting[worker.ready.remote()] = worker  # back in the pool once Ray has restarted it
                attempts[job.job_id] = attempts.get(job.job_id, 0) + 1
                if attempts[job.job_id] < MAX_ATTEMPTS:
                    waiting.appendleft((job, plan))  # at least once: to the next free worker
                    summary.retried += 1
                    if idle:  # one is free already: the restarting worker may never come back
                        send(idle.pop())
                    continue
                reply = {"error": f"its worker died {MAX_ATTEMPTS} times while rendering it ({type(reply).__name__})"}
            else:
                send(worker)  # before writing: the workers render the next jobs while the driver writes these
            settled.append((job, plan, reply))
        for job, plan, reply in settled:
            _settle(job, plan, reply, record, write_from_workers)
        now = time.perf_counter()
        summary.render_seconds = now - first_sent if first_sent else 0.0
        if all_ready is not None:
            summary.steady_images, summary.steady_seconds = summary.images - images_then, now - all_ready
        done, failed, left = len(summary.rendered) + len(summary.skipped), len(summary.failed), len(waiting) + len(running)
        bar.set_postfix_str(
            f"done {done}, failed {failed}, left {left}, {summary.images_per_second:.2f} images/s", refresh=False
        )
        bar.update(len(settled))
    for job, _ in waiting:  # every worker failed to start
        record.failed(job, "no Ray worker could start (see the Ray log of the workers)")


def _worker_ready(ray, ref, worker, summary: ClusterSummary, send, joined: set[int]) -> None:
    try:
        pid, seconds, _ = ray.get(ref)  # a model that failed to load fails each job with the reason instead
    except ray.exceptions.RayError:  # the worker could not start at all (its process keeps dying)
        return
    if id(worker) not in joined:
        joined.add(id(worker))
        summary.workers += 1
    summary.worker_pids.append(pid)  # a restarted worker again, with its new process
    summary.model_load_seconds = max(summary.model_load_seconds, seconds)
    send(worker)


def _reply(ray, ref):
    """A worker's reply, or the exception that stands for it (the worker died, the reply was lost)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        return error


def _settle(job: Job, plan: JobPlan, reply, record, write_from_workers: bool) -> None:
    """One reply: the job's files written (or found) and recorded done, or its failure recorded."""
    if isinstance(reply, Exception):  # what Ray says instead of the reply (an object lost with its node...)
        record.failed(job, failure_reason(reply, job, record.root))
        return
    if "error" in reply:
        record.failed(job, reply["error"])
        return
    if not write_from_workers:
        try:
            write_job_files(plan, reply["pngs"], record.root)
        except Exception as error:  # the disk, a file that appeared meanwhile holding another image
            record.failed(job, failure_reason(error, job, record.root))
            return
    rendered = reply.get("rendered", True)
    record.summary.images += len(plan.paths) if rendered else 0
    record.done(job, plan.paths, rendered, reply["warnings"])
