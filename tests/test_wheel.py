"""A built wheel works on its own: installed away from the source checkout, `studio generate` finds the
embedded model inside the installed package and draws what it is asked to."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_the_model_and_generates_from_any_folder(tmp_path):
    # 1. build the wheel from a copy of the sources (a build writes build/ beside them), without isolation:
    # offline, with this environment's setuptools
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "outputs", ".train*", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("studio-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "studio_assets/embedded-model/model_index.json" in names
    assert "studio_pipelines/text_to_image.py" in names and not any(n.startswith("pipelines/") for n in names)
    # every package of the source tree is listed in pyproject.toml's explicit packages
    for init in (ROOT / "studio").rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names, init

    # 2. install it apart from the checkout; this environment provides its dependencies
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )

    # 3. generate from an unrelated folder: the installed package, not the checkout, must be what runs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    script = (
        "import studio, sys; from studio.cli import main; print(studio.__file__); "
        "sys.exit(main(['generate', 'a large red circle in the center on a white background', "
        "'--seed', '1', '--steps', '8', '-o', 'out.png', '--quiet']))"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(str(target)), run.stdout
    image = np.asarray(Image.open(elsewhere / "out.png").convert("RGB"), dtype=np.int16)
    red = (image[..., 0] > 150) & (image[..., 1] < 100) & (image[..., 2] < 100)
    assert red.mean() > 0.05, f"only {red.mean():.3f} of the image is red"
