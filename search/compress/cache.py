"""A content-addressed cache of compressed checkpoints, safe across processes sharing a filesystem.

One entry per key: a folder that appears only by an atomic rename once complete, so a reader never
sees a half-written checkpoint. A per-key lock file makes a second worker asking for the same key
wait for the first instead of compressing twice. A size cap evicts the least recently used entries.
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

_META = "cache_entry.json"


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
    def _lock(self, key: str) -> Iterator[None]:
        with open(self.root / "locks" / f"{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
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
            with self._lock(entry.name):
                # Renamed away first, so no reader finds a folder being deleted.
                doomed = self.root / "tmp" / f"evict-{entry.name}-{os.getpid()}"
                os.replace(entry, doomed)
                shutil.rmtree(doomed)
            total -= size
            evicted.append(entry.name)
        return evicted
