"""The benchmarks that cannot run here (GPU) still run their code: a dry run on tiny models, so they cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_dry_run_prints_every_row(tmp_path):
    done = subprocess.run(
        [sys.executable, "benchmarks/tasks_gpu.py", "--dry-run", "--tasks", "--model-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for architecture in ("sd15", "sdxl"):
        assert f"{architecture}, 64x64, 2 steps, batch 2" in done.stdout
    for row in ("plain diffusers", "studio (defaults)", "+ channels_last", "+ fused QKV", "+ torch.compile",
                "+ step cache (interval 3)"):
        assert done.stdout.count(row) == 2, (row, done.stdout)
    assert "imagic" in done.stdout and "failed" not in done.stdout, done.stdout
