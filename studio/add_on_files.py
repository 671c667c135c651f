"""What LoRA, embedding and VAE files share: how a reference is told to be a path, the rules a given path
meets (a server takes names only; pickles only by opt-in), and what was read from a file, kept per file version."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from .requests import StudioInputError, quote
from .settings import Settings

NO_MODELS_FOLDER = "; no models folder is set to look in (--models-dir or STUDIO_MODELS_DIRS)"


def looks_like_path(value: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether a reference is a path (a separator, ~ or ., or one of the file `suffixes`) rather than a name."""
    return "/" in value or "\\" in value or value.startswith(("~", ".")) or Path(value).suffix.lower() in suffixes


def refuse_paths_on_a_server(value: str, settings: Settings, kind: str, kinds: str) -> None:
    """A server takes add-ons by name only: the same answer whether the file exists or not."""
    if not settings.lora_paths:
        raise StudioInputError(
            f"{kind} {quote(value)}: this server takes {kinds} by name (from its models folders), not by path"
        )


def refuse_pickle(path: Path, settings: Settings, kind: str, label: str, pickle_suffixes: tuple[str, ...]) -> None:
    """A pickle (one of the kind's `pickle_suffixes`) without --allow-pickle is refused, naming the file."""
    suffix = path.suffix.lower()
    if suffix in pickle_suffixes and not settings.allow_pickle:
        raise StudioInputError(
            f"{kind} {quote(label)} ({path}) is a pickle ({suffix}), which can run code when loaded; use a "
            ".safetensors file, or opt in with --allow-pickle (loaded with weights_only)"
        )


class LruCache:
    """Values by key, the last `capacity` kept, least recently used out first; safe across threads.
    One per ModelManager (a studio's model cache), never module-level state."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[tuple, Any] = OrderedDict()
        self.loads = 0  # values loaded rather than found (the tests check the cache with it)
        self._lock = threading.Lock()

    def get_or_load(self, key: tuple, load: Callable[[], Any]):
        with self._lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        value = load()  # outside the lock: a load can take seconds
        with self._lock:
            self.loads += 1
            self.entries[key] = value
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()


class FileCache(LruCache):
    """`read(path, allow_pickle)`'s result per file version (path, size, mtime)."""

    def __init__(self, read: Callable[[Path, bool], Any], capacity: int):
        super().__init__(capacity)
        self.read = read

    def get(self, path: Path, allow_pickle: bool = False):
        stat = path.stat()
        return self.get_or_load((str(path), stat.st_size, stat.st_mtime_ns), lambda: self.read(path, allow_pickle))
