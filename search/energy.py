"""Energy over a workload window: GPU counters (NVML), CPU package counters (RAPL), or an estimate.

Every meter has the same three calls: ``measure_idle(seconds)`` once before the workload, then
``start()`` and ``stop() -> EnergyReading`` around each window. ``make_meter`` picks the best source
this machine has. The pure functions at the top hold all the arithmetic so that it can be tested
without hardware; ``window_metrics`` merges one measured window's reading with its requests.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from search import windows, workload
from search.config import TrialConfig
from search.workload import RequestResult

# Basis for EstimateMeter's default: an Intel Xeon Platinum 8480+ is rated 350 W TDP for 56 cores
# (Intel ARK), i.e. 6.25 W for each fully busy core. A crude, declared assumption, not a measurement.
WATTS_PER_BUSY_CORE = 350.0 / 56

DEFAULT_SAMPLE_HZ = 20.0


# ---------------------------------------------------------------------------------------------
# Pure maths


def counter_delta(start_mj: float, end_mj: float, wrap_at: float = 2**64) -> float:
    """Increase of an energy counter that restarts at 0 when it reaches wrap_at (any unit: NVML
    counts mJ, RAPL µJ). Correct when it wrapped at most once between the two reads; the meters
    sample often enough for that."""
    return end_mj - start_mj if end_mj >= start_mj else end_mj + wrap_at - start_mj


def integrate_power(trace: list[tuple[float, float]]) -> float:
    """Joules from (t_seconds, watts) samples by the trapezoid rule (0 for fewer than 2 samples)."""
    return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(trace, trace[1:]))


def net_of_idle(gross_j: float, idle_w: float, duration_s: float) -> float:
    """Energy above the idle draw over the window, never below 0 (noise can push it there)."""
    return max(0.0, gross_j - idle_w * duration_s)


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def summarize(
    gross_j: float,
    idle_w: float,
    duration_s: float,
    trace: list[tuple[float, float]],
    n_requests: int,
    output_tokens: int,
) -> dict[str, float]:
    """Flat metrics of one window.

    Per-request and per-token figures use gross energy (what the hardware drew, idle included: an
    idle server is part of the serving cost); the idle-free energy is reported beside them.
    """
    avg_w = _ratio(gross_j, duration_s)
    return {
        "energy_j": gross_j,
        "energy_net_j": net_of_idle(gross_j, idle_w, duration_s),
        "energy_j_per_request": _ratio(gross_j, n_requests),
        "energy_j_per_output_token": _ratio(gross_j, output_tokens),
        "tokens_per_wh": _ratio(output_tokens, gross_j / 3600.0),
        "avg_power_w": avg_w,
        "peak_power_w": max((w for _, w in trace), default=avg_w),
        "idle_power_w": idle_w,
        "window_s": duration_s,
    }


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, range and relative std of repeated windows."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "rel_std": _ratio(std, mean)}


def meter_kind(source: str) -> str:
    """The meter a reading's source names: 'nvml-power' is NVML, integrated where a GPU has no counter."""
    return source.split("-")[0]


# ---------------------------------------------------------------------------------------------
# Readings and meters


@dataclass
class EnergyReading:
    source: str  # 'nvml' | 'nvml-power' | 'rapl' | 'estimate'
    method: str  # how the number was made, assumptions included
    gpus: list[str]
    idle_w: float
    duration_s: float
    joules_gross: float
    joules_net: float
    avg_w: float
    peak_w: float
    trace: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, watts)
    started_at: float = 0.0  # time.monotonic() at the window's start: the requests' clock

    def as_metrics(self, n_requests: int, output_tokens: int) -> dict[str, float]:
        return summarize(self.joules_gross, self.idle_w, self.duration_s, self.trace, n_requests, output_tokens)


def check_energy_source(study_source: str | None, reading: EnergyReading) -> None:
    """A window read by another meter than the study's fails the trial: the two do not compare."""
    if study_source and meter_kind(reading.source) != study_source:
        raise RuntimeError(f"this trial's energy came from {reading.source}, the study's from "
                           f"{study_source}: the two do not compare (a GPU lost, a counter unreadable?)")


def window_metrics(results: list[RequestResult], reading: EnergyReading, config: TrialConfig,
                   served: int) -> dict[str, float]:
    """One measured run: counts, latencies, the whole run's energy and its steady state's, with the
    objective window's J/request as `energy_j_per_request`. Energy is per request served: a
    configuration whose requests fail is not made cheaper by them."""
    stats = workload.summarize(results, reading.duration_s)
    metrics = {**stats, **reading.as_metrics(served, int(stats["completion_tokens"]))}
    ok = [r for r in results if not r.error]
    metrics.update(windows.steady_metrics(
        [(r.token_times[0], r.ended_at) for r in ok if r.token_times], [r.token_times for r in ok],
        reading.trace, reading.started_at, reading.joules_gross, reading.idle_w, config.serve.max_num_seqs,
        stats["tokens_per_answer"]))
    windows.read_objective_window(metrics, config.workload)
    return metrics


class Meter:
    """Measures energy between start() and stop().

    Subclasses implement three hooks: ``_begin()`` (read counters at the window start),
    ``_sample(t) -> watts`` (called at t=0, then by a background thread at ``sample_hz``, and once
    at stop; None when there is no value yet) and ``_finish(duration_s) -> (joules, source,
    method)``. This base class runs the sampler, times the window and builds the EnergyReading.
    """

    def __init__(self, sample_hz: float = DEFAULT_SAMPLE_HZ, idle_w: float = 0.0):
        self.sample_hz = sample_hz
        self.idle_w = idle_w
        self.gpus: list[str] = []
        self._trace: list[tuple[float, float]] = []
        self._t0 = 0.0
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def measure_idle(self, seconds: float) -> float:
        """Average power over an idle window; later windows subtract it for their net energy."""
        self.start()
        time.sleep(seconds)
        self.idle_w = self.stop().avg_w
        return self.idle_w

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("meter already started")
        self._trace = []
        self._begin()
        self._t0 = time.monotonic()
        self._record()
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._run, name=f"{type(self).__name__}-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> EnergyReading:
        if self._thread is None:
            raise RuntimeError("meter not started")
        self._stop_event.set()
        self._thread.join()
        self._thread = None
        self._record()  # a last sample so that the trace spans the whole window
        duration = time.monotonic() - self._t0
        joules, source, method = self._finish(duration)
        trace = list(self._trace)
        return EnergyReading(
            source=source,
            method=method,
            gpus=list(self.gpus),
            idle_w=self.idle_w,
            duration_s=duration,
            joules_gross=joules,
            joules_net=net_of_idle(joules, self.idle_w, duration),
            avg_w=_ratio(joules, duration),
            peak_w=max((w for _, w in trace), default=_ratio(joules, duration)),
            trace=trace,
            started_at=self._t0,
        )

    def close(self) -> None:
        """Release the meter's resources (NVML handle etc.)."""

    def _run(self) -> None:
        period = 1.0 / self.sample_hz
        while not self._stop_event.wait(period):
            self._record()

    def _record(self) -> None:
        t = time.monotonic() - self._t0
        watts = self._sample(t)
        if watts is not None:
            self._trace.append((t, watts))

    def _begin(self) -> None:
        raise NotImplementedError

    def _sample(self, t: float) -> float | None:
        raise NotImplementedError

    def _finish(self, duration_s: float) -> tuple[float, str, str]:
        raise NotImplementedError


def _pynvml():
    import pynvml  # imported late: optional, and tests put a fake in sys.modules

    return pynvml


def visible_gpu_ids(env: str | None = None) -> list[int | str] | None:
    """GPUs named by CUDA_VISIBLE_DEVICES: ints (NVML index) or 'GPU-...' UUIDs; None when unset.

    Integers are taken as NVML indices, which equal CUDA's when CUDA_DEVICE_ORDER=PCI_BUS_ID (the
    usual setting on servers); UUIDs are exact either way.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES") if env is None else env
    if env is None:
        return None
    ids: list[int | str] = []
    for item in (part.strip() for part in env.split(",")):
        if item.isdigit():
            ids.append(int(item))
        elif item.startswith("GPU-"):
            ids.append(item)
        else:
            break  # CUDA stops at the first invalid entry (e.g. "-1" hides all GPUs)
    return ids


class NvmlMeter(Meter):
    """GPU energy from NVML's total-energy counter (mJ), summed over the selected GPUs.

    A sampler thread reads nvmlDeviceGetPowerUsage for the trace; a GPU without the energy counter
    gets the integral of its sampled power instead (source 'nvml-power').
    """

    def __init__(self, gpu_indices: list[int] | None = None, sample_hz: float = DEFAULT_SAMPLE_HZ):
        super().__init__(sample_hz)
        self._nvml = _pynvml()
        self._nvml.nvmlInit()
        try:
            ids = visible_gpu_ids() if gpu_indices is None else list(gpu_indices)
            if ids is None:
                ids = list(range(self._nvml.nvmlDeviceGetCount()))
            if not ids:
                raise RuntimeError("no GPU selected")
            self.gpu_ids = ids
            self._handles = [self._handle(i) for i in ids]
            self.gpus = [_text(self._nvml.nvmlDeviceGetName(h)) for h in self._handles]
            self._has_counter = [self._energy_mj(h) is not None for h in self._handles]
        except BaseException:
            self._nvml.nvmlShutdown()
            raise
        self._start_mj: list[float | None] = []
        self._per_gpu: list[list[tuple[float, float]]] = []

    def _handle(self, gpu_id: int | str):
        if isinstance(gpu_id, str):
            return self._nvml.nvmlDeviceGetHandleByUUID(gpu_id)
        return self._nvml.nvmlDeviceGetHandleByIndex(gpu_id)

    def _energy_mj(self, handle) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except self._nvml.NVMLError:
            return None

    def _begin(self) -> None:
        self._per_gpu = [[] for _ in self._handles]
        self._start_mj = [self._energy_mj(h) if ok else None for h, ok in zip(self._handles, self._has_counter)]

    def _sample(self, t: float) -> float:
        total = 0.0
        for handle, samples in zip(self._handles, self._per_gpu):
            watts = self._nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # NVML reports mW
            samples.append((t, watts))
            total += watts
        return total

    def _finish(self, duration_s: float) -> tuple[float, str, str]:
        joules = 0.0
        integrated: list[str] = []
        counted: list[str] = []
        for i, handle in enumerate(self._handles):
            label = f"GPU {self.gpu_ids[i]} ({self.gpus[i]})"
            start = self._start_mj[i]
            end = self._energy_mj(handle) if start is not None else None
            if start is not None and end is not None:
                joules += counter_delta(start, end) / 1000.0
                counted.append(label)
            else:
                joules += integrate_power(self._per_gpu[i])
                integrated.append(label)
        counter_text = (
            f"NVML total energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ; it advances about every "
            f"0.1 s) read at start and stop on {', '.join(counted)}"
        )
        if not integrated:
            return joules, "nvml", f"{counter_text}, summed; power sampled at {self.sample_hz:g} Hz for the trace only."
        method = (
            f"NVML board power (nvmlDeviceGetPowerUsage) sampled at {self.sample_hz:g} Hz and integrated by the "
            f"trapezoid rule on {', '.join(integrated)}, which has no energy counter (assumes power linear "
            f"between samples)"
        )
        return joules, "nvml-power", f"{method}; {counter_text}." if counted else f"{method}."

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


RAPL_ROOT = "/sys/class/powercap"


class RaplMeter(Meter):
    """CPU package energy from Linux powercap RAPL counters (µJ), summed over packages.

    Only top-level zones (intel-rapl:N) are read: their sub-zones (core, uncore, dram) are either
    inside the package figure or platform dependent. Deltas are accumulated at every sample, so a
    counter that wraps several times in a long window is still counted right.
    """

    def __init__(self, root: str = RAPL_ROOT, sample_hz: float = DEFAULT_SAMPLE_HZ):
        super().__init__(sample_hz)
        self._zones = rapl_zones(root)
        if not self._zones:
            raise RuntimeError(f"no readable RAPL package zone under {root}")
        self._wrap = [float(_read(Path(z) / "max_energy_range_uj")) for z in self._zones]
        self._names = [_read(Path(z) / "name") for z in self._zones]
        self._last: list[float] = []
        self._joules = 0.0
        self._last_t: float | None = None  # no interval before the first sample

    def _begin(self) -> None:
        self._last = self._read_all()
        self._joules = 0.0
        self._last_t = None

    def _sample(self, t: float) -> float | None:
        # Counters give energy per interval: its mean power is placed at the interval's end.
        now = self._read_all()
        step = sum(counter_delta(a, b, w) for a, b, w in zip(self._last, now, self._wrap)) / 1e6
        self._joules += step
        watts = step / (t - self._last_t) if self._last_t is not None and t > self._last_t else None
        self._last, self._last_t = now, t
        return watts

    def _finish(self, duration_s: float) -> tuple[float, str, str]:
        return self._joules, "rapl", (
            f"Linux RAPL energy counters ({', '.join(self._names)}; energy_uj, wrap at max_energy_range_uj) "
            f"accumulated every {1 / self.sample_hz:.3g} s; CPU packages only, no GPU, DRAM or platform power."
        )

    def _read_all(self) -> list[float]:
        return [float(_read(Path(z) / "energy_uj")) for z in self._zones]


def _read(path: Path) -> str:
    return path.read_text().strip()


def rapl_zones(root: str = RAPL_ROOT) -> list[str]:
    """Top-level RAPL zones whose energy counter this process can read."""
    zones = []
    for zone in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
        if os.path.basename(zone).count(":") != 1:
            continue
        try:
            int(_read(Path(zone) / "energy_uj"))
            int(_read(Path(zone) / "max_energy_range_uj"))
        except (OSError, ValueError):
            continue  # energy_uj is root-only on many kernels
        zones.append(zone)
    return zones


class EstimateMeter(Meter):
    """Energy estimated from the CPU time of a process tree: busy core-seconds x assumed watts.

    ``pids_provider`` is called at every sample (the server may start workers late); each pid and
    its children (recursive) are followed. A process that ends between samples loses at most one
    sample period of CPU time.
    """

    def __init__(
        self,
        pids_provider: Callable[[], list[int]],
        watts_per_busy_core: float = WATTS_PER_BUSY_CORE,
        idle_w: float = 0.0,
        sample_hz: float = DEFAULT_SAMPLE_HZ,
    ):
        super().__init__(sample_hz)
        self.pids_provider = pids_provider
        self.watts_per_busy_core = watts_per_busy_core
        # base_w: the assumed constant platform draw, part of every window's gross energy.
        # idle_w: what net energy subtracts; measure_idle() sets it to base_w + the idle CPU share.
        self.base_w = idle_w
        self.idle_w = idle_w
        self._first: dict[tuple[int, float], float] = {}
        self._latest: dict[tuple[int, float], float] = {}
        self._last_busy = 0.0
        self._last_t: float | None = None  # no interval before the first sample

    def _cpu_times(self) -> dict[tuple[int, float], float]:
        import psutil

        seen: dict[tuple[int, float], float] = {}
        for pid in self.pids_provider():
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                try:
                    with proc.oneshot():
                        times = proc.cpu_times()
                        key = (proc.pid, proc.create_time())  # pid + start time: pids get reused
                    seen[key] = times.user + times.system
                except psutil.Error:
                    continue
        return seen

    def _busy_seconds(self) -> float:
        # Processes alive at start count from their start value; those born later count in full.
        return sum(cpu - self._first.get(key, 0.0) for key, cpu in self._latest.items())

    def _begin(self) -> None:
        self._first = self._cpu_times()
        self._latest = dict(self._first)
        self._last_busy = 0.0
        self._last_t = None

    def _sample(self, t: float) -> float | None:
        self._latest.update(self._cpu_times())  # keeps the last value of processes that ended
        busy = self._busy_seconds()
        watts = None
        if self._last_t is not None and t > self._last_t:
            watts = self.base_w + (busy - self._last_busy) / (t - self._last_t) * self.watts_per_busy_core
        self._last_busy, self._last_t = busy, t
        return watts

    def _finish(self, duration_s: float) -> tuple[float, str, str]:
        busy = self._busy_seconds()
        joules = busy * self.watts_per_busy_core + self.base_w * duration_s
        default = self.watts_per_busy_core == WATTS_PER_BUSY_CORE
        basis = " (350 W TDP of a 56-core Xeon Platinum 8480+, shared evenly)" if default else ""
        return joules, "estimate", (
            f"ESTIMATE, not a measurement: {busy:.3f} CPU-seconds (user+system, psutil) of the served process "
            f"tree x an assumed {self.watts_per_busy_core:.3g} W per busy core{basis} + an assumed "
            f"{self.base_w:.3g} W constant platform draw; GPU, memory and other processes' energy are not seen."
        )


def machine_source() -> str:
    """The meter this machine's trials use: 'nvml', 'rapl' or 'estimate'. A study keeps one: the
    energies of two of them do not compare."""
    meter = make_meter(None, list)
    meter.close()
    return "nvml" if isinstance(meter, NvmlMeter) else "rapl" if isinstance(meter, RaplMeter) else "estimate"


def make_meter(gpu_indices: list[int] | None, pids_provider: Callable[[], list[int]],
               sample_hz: float = DEFAULT_SAMPLE_HZ) -> Meter:
    """NVML if a GPU is reachable, else RAPL if readable, else the CPU-time estimate."""
    try:
        return NvmlMeter(gpu_indices, sample_hz)
    except Exception:  # no pynvml, no driver, no GPU selected: all mean "no NVML here"
        pass
    if rapl_zones():
        return RaplMeter(sample_hz=sample_hz)
    return EstimateMeter(pids_provider, sample_hz=sample_hz)


# ---------------------------------------------------------------------------------------------
# Output


def write_trace_csv(reading: EnergyReading, path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t_s", "watts"])
        writer.writerows((f"{t:.4f}", f"{w:.3f}") for t, w in reading.trace)


def plot_trace(reading: EnergyReading, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    try:
        if reading.trace:
            ts, ws = zip(*reading.trace)
            ax.plot(ts, ws, lw=1.2, label=f"power ({reading.source})")
        ax.axvspan(0, reading.duration_s, color="tab:green", alpha=0.08, label=f"window {reading.duration_s:.1f} s")
        ax.axhline(reading.idle_w, color="tab:gray", ls="--", lw=1, label=f"idle {reading.idle_w:.0f} W")
        ax.set_xlabel("time in window (s)")
        ax.set_ylabel("power (W)")
        ax.set_title(
            f"{reading.joules_gross:.0f} J gross, {reading.joules_net:.0f} J net of idle, "
            f"avg {reading.avg_w:.0f} W, peak {reading.peak_w:.0f} W",
            fontsize=9,
        )
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
