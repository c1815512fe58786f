"""The serving stage: a real vLLM OpenAI-compatible server per (checkpoint, engine config).

ServeConfig is the single source of the engine arguments; `vllm_config(...)` turns it into the
exact YAML that `vllm serve MODEL --config vllm_config.yaml` accepts, and the server here is
started from that same file. Servers bind to loopback on a free port, run in their own process
group and are always stopped as a group; a pool keeps the last one warm for trials that only
change request-level settings (on a CPU the start dominates a trial).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from search.config import CompressionConfig, ServeConfig


class ServerFailed(RuntimeError):
    """The server did not start or died; the message is the reason recorded on the trial."""


def vllm_config(serve: ServeConfig, compress: CompressionConfig) -> dict[str, Any]:
    """Engine arguments as `vllm serve --config` reads them (kebab-case keys, nested dicts as JSON)."""
    args: dict[str, Any] = {
        "dtype": serve.dtype,
        "kv-cache-dtype": serve.kv_cache_dtype,
        "max-model-len": serve.max_model_len,
        "max-num-seqs": serve.max_num_seqs,
        "enable-prefix-caching": serve.enable_prefix_caching,
        "enable-chunked-prefill": serve.enable_chunked_prefill,
        "gpu-memory-utilization": serve.gpu_memory_utilization,
        "limit-mm-per-prompt": {"image": serve.limit_images, "audio": 0, "video": 0},
        "mm-processor-kwargs": {"max_soft_tokens": serve.image_soft_tokens},
        "enforce-eager": serve.enforce_eager,
        "seed": serve.seed,
    }
    if serve.distributed_executor_backend != "auto":
        args["distributed-executor-backend"] = serve.distributed_executor_backend
    if serve.attention_backend is not None:
        args["attention-backend"] = serve.attention_backend
    if serve.max_num_batched_tokens is not None:
        args["max-num-batched-tokens"] = serve.max_num_batched_tokens
    if compress.scheme == "bnb_nf4":
        # Seed 000: NF4 applied by vLLM while loading the bf16 checkpoint.
        args["quantization"] = "bitsandbytes"
        args["load-format"] = "bitsandbytes"
    # vLLM 0.26's --config loader drops `key: false` (0.32 turns it into --no-key), which would leave
    # prefix caching and chunked prefill on: a false flag is written as its --no-key form instead.
    return {(key if value is not False else f"no-{key}"): (True if value is False else value)
            for key, value in args.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    model: Path
    config_path: Path
    log_path: Path
    port: int
    process: subprocess.Popen
    started_s: float  # seconds from launch to healthy
    _pids_at_start: list[int] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def served_name(self) -> str:
        return str(self.model)

    def alive(self) -> bool:
        return self.process.poll() is None

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
        """SIGTERM to the whole group, then SIGKILL after grace_s; waits until the port is free."""
        if self.process.poll() is None:
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
        deadline = time.monotonic() + 15
        # SIGKILL lands asynchronously: the engine and workers can outlive this call by a moment.
        while (port_in_use(self.port) or _running(self._pids_at_start)) and time.monotonic() < deadline:
            time.sleep(0.2)
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
    deadline = time.monotonic() + timeout_s
    while True:
        holding = gpu_processes()
        if holding is None or not holding & set(server_pids):
            return
        if time.monotonic() > deadline:
            raise ServerFailed(f"GPU memory not released {timeout_s:.0f} s after stopping the server "
                               f"(processes {sorted(holding & set(server_pids))})")
        time.sleep(0.5)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start(python: str, model: Path, config: dict[str, Any], workdir: Path, timeout_s: float = 600,
          env: dict[str, str] | None = None) -> Server:
    """Write vllm_config.yaml, launch the server from it, wait for /health."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "vllm_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / "server.log"
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--config", str(config_path)]
    env = {**os.environ, **(env or {})}
    if config.get("distributed-executor-backend") == "uni":
        # vLLM's CPU platform turns "uni" back into "mp" unless engine multiprocessing is off.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    launched = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=env, cwd=workdir)
    server = Server(model, config_path, log_path, port, process, 0.0)
    deadline = launched + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            server.stop()
            raise ServerFailed(f"vLLM exited with {process.returncode} before ready: {failure_reason(log_path)}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                server.started_s = time.monotonic() - launched
                server._pids_at_start = server.pids()
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise ServerFailed(f"vLLM not ready within {timeout_s:.0f} s: {failure_reason(log_path)}")


def failure_reason(log_path: Path) -> str:
    """The root cause vLLM logged: its first error line that names an exception type."""
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    markers = ("Error:", "Exception:", "error:")
    for index, line in enumerate(lines):
        text = line.split("] ", 1)[-1].strip()
        if any(m in text for m in markers) and "ulimit" not in text and "Traceback" not in text:
            if "validation error" in text and index + 1 < len(lines):
                text += " " + lines[index + 1].strip()  # pydantic puts the reason on the next line
            return text[:400]
    return lines[-1].strip()[:400] if lines else "no log output"


class ServerPool:
    """Keeps the last server running while consecutive trials need the same one."""

    def __init__(self, python: str, env: dict[str, str] | None = None, ready_timeout_s: float = 600,
                 trust_remote_code: bool = False):
        self.python = python
        self.env = env
        self.ready_timeout_s = ready_timeout_s
        # Code shipped inside a checkpoint runs only when the user opted in (--trust-remote-code).
        self.trust_remote_code = trust_remote_code
        self._current: tuple[tuple, Server] | None = None

    def get(self, model: Path, config: dict[str, Any], workdir: Path) -> tuple[Server, bool]:
        """(server, reused)."""
        config = {**config, "trust-remote-code": self.trust_remote_code}
        key = (str(model), yaml.safe_dump(config, sort_keys=True))
        if self._current and self._current[0] == key and self._current[1].alive():
            return self._current[1], True
        self.close()
        server = start(self.python, model, config, workdir, self.ready_timeout_s, self.env)
        self._current = (key, server)
        return server, False

    def discard(self) -> None:
        """Stop the current server (after a failure its state is not to be trusted)."""
        self.close()

    def close(self) -> None:
        if self._current:
            self._current[1].stop()
            self._current = None
