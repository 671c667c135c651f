"""Output names stay inside the output folder; writes are atomic and never replace finished files."""

import os

import pytest

from studio.outputs import atomic_write_bytes, atomic_write_new, remove_stale_temp_files, safe_output_path
from studio.requests import StudioInputError


@pytest.mark.parametrize("name", ["../../x.png", "..\\..\\x", "/etc/x.png", "C:\\x.png", "a/../../b.png", "x\x00.png"])
def test_escaping_names_are_refused(tmp_path, name):
    with pytest.raises(StudioInputError) as error:
        safe_output_path(tmp_path, name)
    assert repr(name) in str(error.value)


def test_plain_and_nested_names_stay_inside(tmp_path):
    assert safe_output_path(tmp_path, "cat") == (tmp_path / "cat.png").resolve()
    assert safe_output_path(tmp_path, "set 1/cat?.png") == (tmp_path / "set_1" / "cat_.png").resolve()


def test_symlink_inside_the_root_pointing_out_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(StudioInputError, match="leave"):
        safe_output_path(root, "link/x.png")


def test_atomic_writes(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert atomic_write_new(path, b"three") is False
    assert path.read_bytes() == b"two"  # a finished file is never rewritten
    assert atomic_write_new(tmp_path / "b.bin", b"new") is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]  # no temp files left


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / ".studio-tmp-abc.tmp").write_bytes(b"half")
    (tmp_path / "keep.png").write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]
