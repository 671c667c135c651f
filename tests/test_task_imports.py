"""Task modules are cheap to import: the registry (and with it `studio --help`, `studio info`) reads every
task's request class and TASK without torch, diffusers or transformers; and no task imports another."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from studio.tasks import BUILTIN_TASK_MODULES

HEAVY = ("torch", "diffusers", "transformers")
PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def heavy_modules_after(code: str) -> list[str]:
    """The heavy libraries a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_registry_imports_no_torch():
    code = "import studio.tasks as t\nregistry = t.default_registry()\nassert len(registry.names) == len(t.BUILTIN_TASK_MODULES)"
    assert heavy_modules_after(code) == []


def test_studio_help_imports_no_torch():
    code = "from studio.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert heavy_modules_after(code) == []


@pytest.mark.parametrize("module", [*BUILTIN_TASK_MODULES, "studio_pipelines.masks", "studio_pipelines.toolbox"])
def test_each_task_module_alone_imports_no_torch(module):
    assert heavy_modules_after(f"import {module}") == []


def imports_of(path: Path) -> set[str]:
    """Modules a file imports anywhere (relative imports as '.name')."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level and node.module is None:  # from . import masks
                names.update("." + alias.name for alias in node.names)
            else:
                names.add("." * node.level + (node.module or ""))
    return names


def test_no_task_imports_another_task():
    tasks = {module.rsplit(".", 1)[1] for module in BUILTIN_TASK_MODULES}
    for task in tasks:
        imported = imports_of(PIPELINES / f"{task}.py")
        others = {name for name in imported if name.lstrip(".").removeprefix("studio_pipelines.") in tasks - {task}}
        assert not others, f"{task} imports the task module(s) {sorted(others)}; shared code belongs in the toolbox"
