"""What was read from add-on files (LoRAs, embeddings), kept per file version so a file is read once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable


class FileCache:
    """`read(path, allow_pickle)`'s result per file version (path, size, mtime), the last `capacity` kept,
    least recently used out first. One per ModelManager (a studio's model cache), never module-level state."""

    def __init__(self, read: Callable[[Path, bool], Any], capacity: int):
        self.read = read
        self.capacity = capacity
        self.entries: OrderedDict[tuple, Any] = OrderedDict()
        self.reads = 0  # files read from disk (the tests check the cache with it)
        self._lock = threading.Lock()

    def get(self, path: Path, allow_pickle: bool = False):
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        value = self.read(path, allow_pickle)
        with self._lock:
            self.reads += 1
            self.entries[key] = value
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
