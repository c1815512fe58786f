"""GPU energy from NVML, through one adapter: ``Nvml`` is the only code that calls pynvml, so a
test gives ``NvmlMeter`` a fake adapter (or a fake pynvml module) and no GPU is needed."""

from __future__ import annotations

import os

from search.energy.arithmetic import counter_delta, integrate_power
from search.energy.meter import DEFAULT_SAMPLE_HZ, Meter


def _pynvml():
    import pynvml  # imported late: optional, and tests put a fake in sys.modules

    return pynvml


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Nvml:
    """The NVML calls the meter makes, in its units (watts, millijoules, text): initialised on
    construction, shut down by ``close``."""

    def __init__(self, library=None):
        self._lib = library if library is not None else _pynvml()
        self._lib.nvmlInit()

    def count(self) -> int:
        return self._lib.nvmlDeviceGetCount()

    def handle(self, gpu_id: int | str):
        """An NVML device handle by index or by 'GPU-...' UUID."""
        if isinstance(gpu_id, str):
            return self._lib.nvmlDeviceGetHandleByUUID(gpu_id)
        return self._lib.nvmlDeviceGetHandleByIndex(gpu_id)

    def name(self, handle) -> str:
        return _text(self._lib.nvmlDeviceGetName(handle))

    def power_w(self, handle) -> float:
        return self._lib.nvmlDeviceGetPowerUsage(handle) / 1000.0  # NVML reports mW

    def energy_mj(self, handle) -> float | None:
        """The total-energy counter (mJ since the driver loaded); None where the GPU has none."""
        try:
            return float(self._lib.nvmlDeviceGetTotalEnergyConsumption(handle))
        except self._lib.NVMLError:
            return None

    def close(self) -> None:
        self._lib.nvmlShutdown()


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
    gets the integral of its sampled power instead (source 'nvml-power'). ``nvml`` is the adapter
    (a fake in tests); by default one over pynvml.
    """

    def __init__(self, gpu_indices: list[int] | None = None, sample_hz: float = DEFAULT_SAMPLE_HZ,
                 nvml: Nvml | None = None):
        super().__init__(sample_hz)
        self._nvml = nvml if nvml is not None else Nvml()
        try:
            ids = visible_gpu_ids() if gpu_indices is None else list(gpu_indices)
            if ids is None:
                ids = list(range(self._nvml.count()))
            if not ids:
                raise RuntimeError("no GPU selected")
            self.gpu_ids = ids
            self._handles = [self._nvml.handle(i) for i in ids]
            self.gpus = [self._nvml.name(h) for h in self._handles]
            self._has_counter = [self._nvml.energy_mj(h) is not None for h in self._handles]
        except BaseException:
            self._nvml.close()
            raise
        self._start_mj: list[float | None] = []
        self._per_gpu: list[list[tuple[float, float]]] = []

    def _begin(self) -> None:
        self._per_gpu = [[] for _ in self._handles]
        self._start_mj = [self._nvml.energy_mj(h) if ok else None for h, ok in zip(self._handles, self._has_counter)]

    def _sample(self, t: float) -> float:
        total = 0.0
        for handle, samples in zip(self._handles, self._per_gpu):
            watts = self._nvml.power_w(handle)
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
            end = self._nvml.energy_mj(handle) if start is not None else None
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
        self._nvml.close()
