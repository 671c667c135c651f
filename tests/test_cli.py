"""The `studio` command: outputs, metadata, and one-line errors with non-zero exits."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from studio.cli import main


def test_generate_info_replay(sd15_folder, tmp_path, capsys):
    out = tmp_path / "img.png"
    code = main(["generate", "a red circle", "--model", str(sd15_folder), "--steps", "2", "--seed", "7", "-o", str(out), "--quiet"])
    assert code == 0 and out.is_file()
    assert "Seed: 7" in Image.open(out).text["parameters"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["request"]["prompt"] == "a red circle" and info["seed"] == 7
    again = tmp_path / "again.png"
    assert main(["replay", str(out), "-o", str(again), "--quiet"]) == 0
    assert Image.open(again).tobytes() == Image.open(out).tobytes()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "x", "--width", "100"], "width: Input should be a multiple of 8 (got 100)"),
        (["generate", "x", "--steps", "0"], "(got 0)"),
        (["generate", "x", "--cfg", "nan"], "finite"),
        (["generate", "x", "--model", "nobody/not-cached"], "not in the local Hugging Face cache"),
        (["generate", "x", "--model", "missing.safetensors"], "not found"),
        (["info", "no-such.png"], "does not exist"),
        (["batch", "no-such.jsonl", "--out", "o"], "does not exist"),
    ],
)
def test_errors_are_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_script_runs_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "studio.cli", "generate", "x", "--width", "7"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: width") and "Traceback" not in result.stderr
