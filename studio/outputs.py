"""Writing files atomically and keeping user-chosen names inside the output folder."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .requests import MAX_BATCH_SIZE, StudioInputError

TEMP_PREFIX = ".studio-tmp-"


def _write_temp_beside(path: Path, data: bytes) -> str:
    """Write data, fsynced, to a temp file in path's folder (same file system, so rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return temp_name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see the old file or the new one."""
    temp_name = _write_temp_beside(Path(path), data)
    try:
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def atomic_write_new(path: Path, data: bytes) -> bool:
    """Like atomic_write_bytes, but never replaces an existing file; False if one was there."""
    temp_name = _write_temp_beside(Path(path), data)
    try:
        os.link(temp_name, path)  # fails if the target exists: no finished file is ever rewritten
    except FileExistsError:
        return False
    finally:
        Path(temp_name).unlink(missing_ok=True)
    return True


def remove_stale_temp_files(folder: Path) -> int:
    """Delete temp files left by a killed writer; returns how many."""
    count = 0
    if Path(folder).is_dir():
        for temp in Path(folder).glob(TEMP_PREFIX + "*"):
            temp.unlink(missing_ok=True)
            count += 1
    return count


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

# Most file systems allow 255 bytes per file or folder name; staying well under leaves room for
# the "-16" that numbering a batch of images adds, and for the odd file system with less.
MAX_NAME_BYTES = 200
NUMBERING_RESERVE = len(f"-{MAX_BATCH_SIZE}")


def clean_output_name(name: str, *, suffix: str = ".png") -> str:
    """The relative path ("portraits/a.png") a user-chosen name becomes; refuses names that try to
    leave the folder, empty names and names too long for a file system. Touches no file."""
    if "\x00" in name:
        raise StudioInputError(f"output name {name!r} contains a NUL byte")
    parts = re.split(r"[\\/]+", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or any(p in ("..", ".") for p in parts):
        raise StudioInputError(f"output name {name!r} would leave the output folder")
    cleaned = [_UNSAFE.sub("_", part).lstrip(".") for part in parts if part]
    if not cleaned or not cleaned[-1]:
        raise StudioInputError(f"output name {name!r} is empty")
    if not cleaned[-1].lower().endswith(suffix):
        cleaned[-1] += suffix
    cleaned = [part for part in cleaned[:-1] if part] + [cleaned[-1]]  # "a/.../b": no empty folder
    limit = MAX_NAME_BYTES - NUMBERING_RESERVE
    if any(len(part.encode()) > limit for part in cleaned):
        # The reason comes before the name, so that a shortened message still says what is wrong.
        raise StudioInputError(f"output name is too long (at most {limit} characters per file or folder name): {name!r}")
    return "/".join(cleaned)


def safe_output_path(root: Path, name: str, *, suffix: str = ".png") -> Path:
    """A path inside root for a user-chosen name; refuses names that try to leave root.

    Sub-folders are allowed ("portraits/a.png"); "..", absolute paths, drive letters, backslashes,
    NUL bytes and over-long names are refused with the name quoted.
    """
    root = Path(root).resolve()
    path = root.joinpath(*clean_output_name(name, suffix=suffix).split("/")).resolve()
    if root not in path.parents:
        raise StudioInputError(f"output name {name!r} would leave the output folder")
    return path
