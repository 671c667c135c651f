"""The one loop every training stage runs: resume, stop, learning rate, step, timed checkpoints, evaluations, done."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studio.outputs import atomic_write_bytes

from .folders import fsync_dir

STAGES = ("clip", "vae", "unet", "controlnet")
PAUSED = 3  # exit status when stopped early; run again to resume


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def fmt_secs(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --------------------------------------------------------------------------- schedule


@dataclass
class StageSpec:
    steps: int
    batch: int
    lr: float
    warmup: int


SPECS = {
    "clip": StageSpec(steps=1200, batch=64, lr=5e-4, warmup=100),
    "vae": StageSpec(steps=4000, batch=32, lr=1e-3, warmup=100),
    "unet": StageSpec(steps=6000, batch=32, lr=5e-4, warmup=300),
    "controlnet": StageSpec(steps=1000, batch=32, lr=2e-4, warmup=100),
}


def stage_spec(stage: str, steps: int | None = None, lr: float | None = None) -> StageSpec:
    """SPECS[stage] with the command line's step count and peak learning rate, where given."""
    spec = SPECS[stage]
    if not (steps or lr):
        return spec
    steps = steps or spec.steps
    return StageSpec(steps, spec.batch, lr or spec.lr, min(spec.warmup, steps // 5 + 1))


def lr_at(step: int, spec: StageSpec, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor` x peak at the last step."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    t = min(1.0, (step - spec.warmup) / max(1, spec.steps - spec.warmup))
    return spec.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


# --------------------------------------------------------------------------- seeds


def seed_stage(seed: int, stage: str) -> None:
    """Seed torch's global generator, which draws new weights, from (seed, stage) alone.

    A stage's initial weights then do not depend on which stages ran before it in the same
    process, so a run resumed at a stage boundary starts the stage as a straight run does.
    """
    import torch

    torch.manual_seed(seed * len(STAGES) + STAGES.index(stage))


def step_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, STAGES.index(stage), step])


def step_generator(seed: int, stage: str, step: int):
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + STAGES.index(stage) * 10_000_019 + step) % 2**63)


# --------------------------------------------------------------------------- stopping, timing, logging


class Stopper:
    """Wall-clock limit plus SIGTERM/SIGINT: the loops ask `should_stop()` between steps."""

    def __init__(self, minutes: float | None):
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes
        self.signalled = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner)
                pass

    def _handle(self, signum, frame):
        if self.signalled:
            raise KeyboardInterrupt
        self.signalled = True
        log(f"signal {signum}: saving a checkpoint and stopping")

    def should_stop(self) -> bool:
        return self.signalled or (self.deadline is not None and time.monotonic() >= self.deadline)


class Every:
    """A period in minutes: `due()` is true once per period."""

    def __init__(self, minutes: float):
        self.period = 60 * minutes
        self.restart()

    def restart(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        if time.monotonic() - self.last >= self.period:
            self.restart()
            return True
        return False


class TrainingLog:
    """Every `every` steps, one line: mean loss, learning rate, seconds per step and time left."""

    def __init__(self, stage: str, start: int, total: int, every: int = 25):
        self.stage, self.start, self.total, self.every = stage, start, total, every
        self.t0 = time.monotonic()
        self.losses: list[float] = []

    def update(self, step: int, loss: float, lr: float, extra: str = "") -> None:
        self.losses.append(loss)
        done = step + 1 - self.start
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            dt = (time.monotonic() - self.t0) / max(done, 1)
            mean = sum(self.losses) / len(self.losses)
            self.losses = []
            log(
                f"[{self.stage}] step {step + 1}/{self.total} loss {mean:.4f} lr {lr:.2e} "
                f"{dt:.2f} s/it ETA {fmt_secs(dt * (self.total - step - 1))}{extra}"
            )


# --------------------------------------------------------------------------- work dir and checkpoints


class Work:
    """The work dir: state.json (which stages are done), checkpoints, components and evaluation histories."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_f = root / "state.json"

    def state(self) -> dict:
        if self.state_f.exists():
            return json.loads(self.state_f.read_text(encoding="utf-8"))
        return {}

    def mark(self, stage: str, **info) -> None:
        state = self.state()
        state[stage] = {"done": True, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        atomic_write_bytes(self.state_f, (json.dumps(state, indent=2) + "\n").encode("utf-8"))

    def done(self, stage: str) -> bool:
        return bool(self.state().get(stage, {}).get("done"))

    def ckpt(self, stage: str) -> Path:
        return self.root / stage / "checkpoint.pt"

    def component(self, name: str) -> Path:
        return self.root / "components" / name

    def history(self, stage: str) -> Path:
        return self.root / stage / "evals.jsonl"

    def append_history(self, stage: str, record: dict) -> None:
        f = self.history(stage)
        f.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def load_ckpt(path: Path):
    import torch

    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 -- a torn file cannot happen with atomic saves, but never die on one
        log(f"could not read {path} ({exc}); starting the stage over")
        return None


class Checkpoint:
    """A stage's resumable state: named parts (anything with state_dict/load_state_dict) and the step."""

    def __init__(self, work: Work, stage: str, **parts):
        self.path, self.stage, self.parts = work.ckpt(stage), stage, parts

    def resume(self) -> int:
        """Load every part from the checkpoint, if there is one; the step to continue from."""
        ck = load_ckpt(self.path)
        if not ck:
            return 0
        for name, part in self.parts.items():
            part.load_state_dict(ck[name])
        log(f"[{self.stage}] resuming at step {ck['step']}")
        return ck["step"]

    def save(self, step: int) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save({**{name: part.state_dict() for name, part in self.parts.items()}, "step": step}, buffer)
        atomic_write_bytes(self.path, buffer.getbuffer())
        fsync_dir(self.path.parent)


def optimiser_step(loss, lr: float, *trained: tuple) -> None:
    """Backward, then for each (parameters, optimiser, lr scale): clip the gradient to norm 1, step at lr x scale
    (x a parameter group's own "lr_scale", where it has one)."""
    import torch

    for _, opt, _ in trained:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for params, opt, scale in trained:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * scale * group.get("lr_scale", 1.0)
        opt.step()


# --------------------------------------------------------------------------- the loop


@dataclass
class StageRun:
    """One stage's run: its numbers (SPECS with the command line's overrides) and what the loop shares with it."""

    name: str
    spec: StageSpec
    work: Work
    stopper: Stopper
    ckpt_minutes: float

    @classmethod
    def start(cls, name: str, args, work: Work, stopper: Stopper) -> StageRun:
        """Every stage begins here: its spec with --<name>-steps / --<name>-lr where the command line has
        them (today the unet and controlnet stages), and torch seeded for its initial weights."""
        steps, lr = getattr(args, f"{name}_steps", None), getattr(args, f"{name}_lr", None)
        seed_stage(args.seed, name)
        return cls(name, stage_spec(name, steps, lr), work, stopper, args.ckpt_minutes)

    def record(self, step: int, metrics: dict) -> None:
        """Log an evaluation and append it to the stage's evals.jsonl."""
        log(f"[{self.name}] eval step {step}: {metrics}")
        self.work.append_history(self.name, {"step": step, **metrics})


def run_stage(
    run: StageRun,
    parts: dict,
    step_fn: Callable[[int, float], tuple[float, str]],
    finish: Callable[[], dict],
    *,
    evaluate: Callable[[int], dict] | None = None,
    eval_every: int | None = None,
    eval_minutes: float | None = None,
) -> bool:
    """Train a stage from its checkpoint to run.spec.steps; True when done, False when stopped (resumably).

    parts: what the checkpoint holds (name -> anything with state_dict/load_state_dict); parts["model"]
      is the network being trained.
    step_fn(step, lr) -> (loss, extra text for the log line): one optimiser step.
    finish() -> info: after the last step, save the stage's results; `info` goes into its done marker.
    evaluate(step) -> metrics: run every `eval_every` steps or every `eval_minutes`, once past the
      warm-up, after a checkpoint (it may take minutes); logged and kept in the stage's evals.jsonl.
    """
    spec, stage = run.spec, run.name
    ckpt = Checkpoint(run.work, stage, **parts)
    start = ckpt.resume()
    model = parts["model"]
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[{stage}] {type(model).__name__} {n_params / 1e6:.2f}M params; {spec.steps} steps of {spec.batch}")
    ckpt_timer = Every(run.ckpt_minutes)
    eval_timer = Every(eval_minutes) if eval_minutes is not None else None
    training_log = TrainingLog(stage, start, spec.steps)

    def eval_due(steps_done: int) -> bool:
        if evaluate is None or steps_done < min(spec.warmup, spec.steps):
            return False
        if eval_every is not None:
            return steps_done % eval_every == 0
        return eval_timer is not None and eval_timer.due()

    for step in range(start, spec.steps):
        if run.stopper.should_stop():
            ckpt.save(step)
            return False
        lr = lr_at(step, spec)
        loss, extra = step_fn(step, lr)
        training_log.update(step, loss, lr, extra)
        if eval_due(step + 1):
            ckpt.save(step + 1)
            ckpt_timer.restart()
            run.record(step + 1, evaluate(step + 1))
            if eval_timer is not None:
                eval_timer.restart()  # the period counts training time, not evaluation time
        elif ckpt_timer.due():
            ckpt.save(step + 1)

    ckpt.save(spec.steps)
    info = finish()
    run.work.mark(stage, steps=spec.steps, **info)
    log(f"[{stage}] done: {info}")
    return True
