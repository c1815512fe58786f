"""A content-addressed cache of compressed checkpoints, safe across processes sharing a filesystem.

One entry per key: a folder that appears only by an atomic rename once complete, so a reader never
sees a half-written checkpoint. A per-key lock file makes a second worker asking for the same key
wait for the first instead of compressing twice. A size cap evicts the least recently used entries,
and so does a disk too full for the next checkpoint: a long study on a machine's fixed disk keeps going
(an evicted checkpoint is made again from its recipe if a later trial asks for it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

from search.errors import SearchError

_META = "cache_entry.json"


class DiskFull(SearchError, OSError):
    """The disk under the cache cannot hold the next checkpoint, even with every idle entry evicted."""


def _touch(path: Path) -> None:
    """The LRU clock: the metadata file's mtime, set from the fine-grained clock (the file system's
    own stamps are coarse enough for two uses in a row to tie)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


class CheckpointCache:
    def __init__(self, root: str | Path, cap_bytes: int | None = None):
        self.root = Path(root)
        self.cap_bytes = cap_bytes
        for sub in ("entries", "locks", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / "entries" / key

    @contextlib.contextmanager
    def _lock(self, key: str, wait: bool = True) -> Iterator[bool]:
        """Holds the key's lock; without `wait`, yields False at once where another process holds it."""
        with open(self.root / "locks" / f"{key}.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def get_or_create(self, key: str, create: Callable[[Path], dict]) -> tuple[Path, bool, dict]:
        """(checkpoint path, hit, metadata). `create(tmp_dir)` fills tmp_dir and returns metadata."""
        entry = self.path(key)
        with self._lock(key):
            if (entry / _META).exists():
                _touch(entry / _META)
                return entry, True, json.loads((entry / _META).read_text())
            tmp = self.root / "tmp" / f"{key}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                meta = create(tmp)
                meta = {**meta, "key": key, "created": time.time()}
                (tmp / _META).write_text(json.dumps(meta, indent=2))
                _touch(tmp / _META)
                os.replace(tmp, entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self.evict(keep={key})
        return entry, False, meta

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last used, size in bytes, path) of every complete entry."""
        out = []
        for entry in (self.root / "entries").iterdir():
            meta = entry / _META
            if meta.exists():
                size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
                out.append((meta.stat().st_mtime, size, entry))
        return sorted(out)

    def evict(self, keep: set[str] = frozenset()) -> list[str]:
        """Drop least recently used entries until the cache fits its cap; returns the evicted keys."""
        if self.cap_bytes is None:
            return []
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        evicted = []
        for _, size, entry in entries:
            if total <= self.cap_bytes:
                break
            if entry.name in keep:
                continue
            self._remove(entry)
            total -= size
            evicted.append(entry.name)
        return evicted

    def free_disk(self, needed_bytes: int, keep: set[str] = frozenset()) -> list[str]:
        """Evict least recently used entries until the disk under the cache has `needed_bytes` free;
        returns the evicted keys. Entries another process holds are skipped, not waited for (the caller
        holds a key's lock itself). Raises DiskFull when evicting every idle entry is not enough."""
        evicted = []
        for _, _, entry in self.entries():
            if shutil.disk_usage(self.root).free >= needed_bytes:
                break
            if entry.name not in keep and self._remove(entry, wait=False):
                evicted.append(entry.name)
        free = shutil.disk_usage(self.root).free
        if free < needed_bytes:
            raise DiskFull(f"{free / 2**30:.1f} GiB free on the disk under {self.root}, a new checkpoint needs up "
                           f"to {needed_bytes / 2**30:.1f} GiB and the cache has no idle entry left to evict")
        return evicted

    def _remove(self, entry: Path, wait: bool = True) -> bool:
        with self._lock(entry.name, wait) as held:
            if not held or not entry.exists():
                return False
            # Renamed away first, so no reader finds a folder being deleted.
            doomed = self.root / "tmp" / f"evict-{entry.name}-{os.getpid()}"
            os.replace(entry, doomed)
            shutil.rmtree(doomed)
            return True
