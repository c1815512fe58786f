"""`search run --gpus`: one worker process per GPU, all on one study.

Each worker is this same command, started again with ``SEARCH_WORKER_GPU`` set and bound to its GPU
by ``CUDA_VISIBLE_DEVICES`` (in nvidia-smi's order, ``CUDA_DEVICE_ORDER=PCI_BUS_ID``): its server,
its compression and its NVML meter see that GPU only (NVML itself sees every card;
search/energy/nvml.py maps the variable back to the one). The workers count and ask for trials
under the study's lock, so exactly ``--trials`` finish in all (search/study.py).

No worker outlives this process: each runs under search/lifeline.py, which stops it if this process
is killed; a stop signal here (Ctrl-C, SIGTERM, SIGHUP) is passed to every worker, which records its
trial as interrupted (retried on the next run) and stops its servers. A worker that dies leaves its
trial to the heartbeat: after three missed beats another worker fails it and runs it once more.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from search import interrupts, lifeline
from search.energy.nvml import Nvml, visible_gpu_ids

WORKER_GPU_ENV = "SEARCH_WORKER_GPU"  # set in a worker the fan-out started: it runs, it does not fan out
POLL_S = 1.0
WATCH_S = 15.0  # how often the study's counts are read for the progress line
STOP_GRACE_S = 300.0  # a worker's clean-up (its trial recorded, its servers stopped) before it is killed


@dataclass(frozen=True)
class Slot:
    """One worker: its label in messages, the variables that bind it, where its output goes."""

    label: str
    env: dict[str, str]
    log: Path


def present_gpus() -> list[str]:
    """The GPUs this process may use, as nvidia-smi numbers them: those CUDA_VISIBLE_DEVICES names
    (when set; as CUDA reads it), else every GPU NVML finds; [] on a machine without an NVIDIA driver."""
    try:
        nvml = Nvml()
    except Exception:  # no driver, no library: no GPU here, whatever CUDA_VISIBLE_DEVICES says
        return []
    try:
        count = nvml.count()
    finally:
        nvml.close()
    named = visible_gpu_ids()
    return [str(index) for index in range(count)] if named is None else [str(gpu) for gpu in named]


def choose(spec: str, present: list[str]) -> list[str]:
    """`--gpus all` or a comma-separated list of GPU numbers, checked against the GPUs present."""
    if not present:
        raise ValueError("--gpus: this machine has no GPU that NVML finds (run without --gpus: one worker, "
                         "the CPU estimate meter)")
    if spec.strip() == "all":
        return list(present)
    chosen = [gpu.strip() for gpu in spec.split(",")]
    if any(not gpu for gpu in chosen):
        raise ValueError(f"--gpus: {spec!r} is not 'all' or a comma-separated list of GPU numbers, e.g. 0,1")
    missing = [gpu for gpu in chosen if gpu not in present]
    if missing:
        raise ValueError(f"--gpus: GPU {missing[0]} is not on this machine (present: {','.join(present)})")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"--gpus: {spec!r} names a GPU twice")
    return chosen


def gpu_slots(gpus: list[str], log_dir: Path) -> list[Slot]:
    return [Slot(f"GPU {gpu}", {WORKER_GPU_ENV: gpu, "CUDA_VISIBLE_DEVICES": gpu, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
                 log_dir / f"worker-gpu{gpu}.log") for gpu in gpus]


def run_workers(argv: list[str], slots: list[Slot], report=None, watch=None) -> int:
    """Start `argv` once per slot and wait for them all; 0 when every worker ended well, else the
    first failure's code (128 + the signal's number when a stop signal ended the run).
    `report(text)` receives the fan-out's own lines (default: standard error); `watch()`, asked
    every WATCH_S seconds, says how the work stands (its line is reported when it changes)."""
    report = report or (lambda text: print(text, file=sys.stderr, flush=True))
    interrupts.handle_stop_signals()
    workers: dict[str, subprocess.Popen] = {}
    codes: dict[str, int] = {}
    said, next_watch = None, time.monotonic() + WATCH_S
    try:
        for slot in slots:
            slot.log.parent.mkdir(parents=True, exist_ok=True)
            with open(slot.log, "ab") as log:
                # A session of its own: a stop is sent to the worker's whole group, servers included.
                workers[slot.label] = subprocess.Popen(
                    lifeline.command(os.getpid(), argv), env={**os.environ, **slot.env}, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            report(f"{slot.label}: worker pid {workers[slot.label].pid}, log {slot.log}")
        while len(codes) < len(workers):
            for slot in slots:
                code = workers[slot.label].poll()
                if code is None or slot.label in codes:
                    continue
                codes[slot.label] = code
                if code != 0:
                    report(f"{slot.label}: worker ended with code {code}: {_last_line(slot.log)} (its running trial is "
                           "failed after three missed heartbeats and run again by another worker)")
            if watch is not None and time.monotonic() >= next_watch:
                next_watch = time.monotonic() + WATCH_S
                line = watch()
                if line != said:
                    report(line)
                    said = line
            time.sleep(POLL_S)
    except KeyboardInterrupt as exc:  # a stop signal: every worker records its trial and stops
        report(f"{interrupts.signal_name(exc)}: stopping {len(workers) - len(codes)} worker(s)")
        _stop(workers, exc)
        return interrupts.exit_code(exc)
    failed = [code for code in codes.values() if code != 0]
    return failed[0] if failed else 0


def _stop(workers: dict[str, subprocess.Popen], exc: KeyboardInterrupt) -> None:
    signum = getattr(exc, "signum", signal.SIGINT)
    for worker in workers.values():
        if worker.poll() is None:
            try:
                os.killpg(worker.pid, signum)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_GRACE_S
    for worker in workers.values():
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # its lifeline's servers stop when it is gone
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    return lines[-1].strip() if lines else "no output"
