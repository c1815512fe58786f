"""Run one compression through the cache: key, recipe, child process, result."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from search import lifeline
from search.compress import screen as screen_mod
from search.compress.cache import CheckpointCache
from search.compress.screen import PrunedBeforeServing
from search.compress.recipe import build_recipe, needs_calibration, pipeline_for, structured_widths
from search.config import CompressionConfig, flatten
from search.models import family_for
from search.errors import SearchError


class CompressionFailed(SearchError, RuntimeError):
    """The child process failed; the message is the reason recorded on the trial."""


@dataclass(frozen=True)
class CompressResult:
    checkpoint: Path
    recipe: dict
    key: str | None
    cache_hit: bool
    seconds: float  # spent by this call
    saved_seconds: float  # what the cached compression once cost, on a hit
    size_bytes: int
    screen: dict | None = None  # the pre-serve screen's result when it ran (a compression, not a hit)


def model_fingerprint(model_dir: Path, memo_dir: Path) -> str:
    """sha256 of every file of a checkpoint, memoised by (path, sizes, mtimes) so 16 GB hash once."""
    return model_digests(model_dir, memo_dir)[0]


def model_digests(model_dir: Path, memo_dir: Path) -> tuple[str, dict[str, str]]:
    """The checkpoint's fingerprint and each file's own sha256 by its path in the checkpoint (so that a
    refused resume can name the file that changed), from one read of the files. The fingerprint's
    formula never changes: committed studies hold fingerprints made by it."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    stamp = hashlib.sha256(json.dumps(
        [str(model_dir.resolve())] + [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    ).encode()).hexdigest()
    memo = memo_dir / f"digests-{stamp}.json"
    if memo.exists():
        saved = json.loads(memo.read_text())
        return saved["fingerprint"], saved["files"]
    digest, each = hashlib.sha256(), {}
    for p in files:
        name = str(p.relative_to(model_dir))
        digest.update(name.encode())
        own = hashlib.sha256()
        with open(p, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
                own.update(block)
        each[name] = own.hexdigest()
    memo_dir.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps({"fingerprint": digest.hexdigest(), "files": each}))
    return digest.hexdigest(), each


def cache_key(base_fingerprint: str, config: CompressionConfig, llmcompressor_version: str) -> str:
    material = {"base": base_fingerprint, "compress": flatten(config), "llmcompressor": llmcompressor_version}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


class Compressor:
    """A long-lived compression child process, restarted after a crash or a time-out."""

    def __init__(self, python: str, trust_remote_code: bool = False):
        self.python = python
        self.trust_remote_code = trust_remote_code
        self._process: subprocess.Popen | None = None

    def run(self, spec_path: Path, log_path: Path, timeout_s: float) -> dict:
        if self._process is None or self._process.poll() is not None:
            # A group of its own under a lifeline: the worker dies with this process, even by SIGKILL.
            self._process = subprocess.Popen(
                lifeline.command(os.getpid(), [self.python, "-m", "search.compress.worker", "--serve"]),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                cwd=Path(__file__).resolve().parents[2], start_new_session=True)
        process = self._process
        process.stdin.write(f"{spec_path}\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], timeout_s)
        if not ready:
            self.close()
            raise CompressionFailed(f"compression exceeded its {timeout_s:.0f} s budget")
        line = process.stdout.readline()
        if not line:  # the process died: killed by the OS (out of memory) or crashed
            code = process.wait()
            self._process = None
            raise CompressionFailed(f"compression process exited {code}: {_last_error(log_path)}")
        reply = json.loads(line)
        if reply.get("pruned"):  # the pre-serve screen stopped it: nothing saved
            raise PrunedBeforeServing(reply["pruned"], reply["screen"])
        if not reply["ok"]:
            raise CompressionFailed(f"compression failed: {reply['error']}")
        return reply["stats"]

    def close(self) -> None:
        """Kill the worker; safe from another thread (a trial over its time budget)."""
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def compress(config: CompressionConfig, base_model: Path, cache: CheckpointCache, compressor: Compressor,
             llmcompressor_version: str, log_path: Path, timeout_s: float = 3600,
             make_room: Callable[[], None] = lambda: None, screen: dict | None = None) -> CompressResult:
    """The checkpoint of `config`, from the cache or made now; `make_room` runs just before a real
    compression (on a GPU machine the idle server of the last trial holds 90% of the memory).

    `screen` (search/compress/screen.py's spec) scores a model compressed now before it is saved:
    PrunedBeforeServing when it cannot reach the gate, leaving no cache entry. The same weights
    pruned under the same settings before are pruned again without compressing."""
    started = time.perf_counter()
    model_config = json.loads((base_model / "config.json").read_text())
    num_layers = model_config.get("text_config", model_config)["num_hidden_layers"]
    recipe = build_recipe(config, num_layers, family_for(model_config))
    ffn_widths = structured_widths(config, model_config)
    if not config.needs_checkpoint:
        return CompressResult(base_model, recipe, None, False, 0.0, 0.0, 0)
    key = cache_key(model_fingerprint(base_model, cache.root / "fingerprints"), config, llmcompressor_version)
    if screen is not None and (remembered := screen_mod.remembered_prune(cache.root, key, screen)):
        raise remembered
    screened: dict = {}

    def create(out_dir: Path) -> dict:
        work = cache.root / "tmp" / f"{key}-spec"
        work.mkdir(parents=True, exist_ok=True)
        recipe_path = work / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        spec = {"base_model": str(base_model), "out_dir": str(out_dir), "recipe_path": str(recipe_path),
                "log_path": str(log_path), "trust_remote_code": compressor.trust_remote_code,
                "pipeline": pipeline_for(recipe, model_config), "needs_calibration": needs_calibration(recipe),
                "calibration": flatten(config.calibration), "ffn_widths": ffn_widths, "screen": screen}
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        cache.free_disk(_checkpoint_bound(base_model), keep={key})
        make_room()
        t0 = time.perf_counter()
        stats = compressor.run(spec_path, log_path, timeout_s)
        screened.update(stats.pop("screen", None) or {})
        return {**stats, "compress_seconds": time.perf_counter() - t0}

    try:
        checkpoint, hit, meta = cache.get_or_create(key, create)
    except screen_mod.PrunedBeforeServing as pruned:
        screen_mod.remember_prune(cache.root, key, screen, pruned.result)
        raise
    return CompressResult(checkpoint, recipe, key, hit, time.perf_counter() - started,
                          meta["compress_seconds"] if hit else 0.0, meta["size_bytes"], screened or None)


def _checkpoint_bound(base_model: Path) -> int:
    """The most disk a compressed copy of `base_model` takes: its weights (compression only shrinks
    them) and a GiB for the rest (tokenizer, processor, recipe)."""
    return sum(p.stat().st_size for p in base_model.glob("*.safetensors")) + 2**30


def _last_error(log_path: Path) -> str:
    """The most telling line of a failed child's log: its last exception line."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line or line.startswith("Killed"):
            return line[:300]
    return lines[-1][:300] if lines else "no output (killed by the OS? out of memory?)"
