"""Which meter this machine has: NVML if a GPU is reachable, else RAPL if readable, else the estimate."""

from __future__ import annotations

from typing import Callable

from search.energy import rapl
from search.energy.estimate import EstimateMeter
from search.energy.meter import DEFAULT_SAMPLE_HZ, Meter
from search.energy.nvml import NvmlMeter


def make_meter(gpu_indices: list[int] | None, pids_provider: Callable[[], list[int]],
               sample_hz: float = DEFAULT_SAMPLE_HZ) -> Meter:
    """NVML if a GPU is reachable, else RAPL if readable, else the CPU-time estimate."""
    try:
        return NvmlMeter(gpu_indices, sample_hz)
    except Exception:  # no pynvml, no driver, no GPU selected: all mean "no NVML here"
        pass
    if rapl.rapl_zones():
        return rapl.RaplMeter(sample_hz=sample_hz)
    return EstimateMeter(pids_provider, sample_hz=sample_hz)


def machine_source() -> str:
    """The meter this machine's trials use: 'nvml', 'rapl' or 'estimate'. A study keeps one: the
    energies of two of them do not compare."""
    meter = make_meter(None, list)
    meter.close()
    return "nvml" if isinstance(meter, NvmlMeter) else "rapl" if isinstance(meter, rapl.RaplMeter) else "estimate"
