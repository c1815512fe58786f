"""What every meter shares: the reading it returns and the base class that runs its sampler.

Every meter has the same three calls: ``measure_idle(seconds)`` once before the workload, then
``start()`` and ``stop() -> EnergyReading`` around each window. A meter is one module of this
package with a ``Meter`` subclass (nvml.py, rapl.py, estimate.py), and choose.py picks one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from search.energy.arithmetic import net_of_idle, ratio, summarize

DEFAULT_SAMPLE_HZ = 20.0


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


def meter_kind(source: str) -> str:
    """The meter a reading's source names: 'nvml-power' is NVML, integrated where a GPU has no counter."""
    return source.split("-")[0]


def check_energy_source(study_source: str | None, reading: EnergyReading) -> None:
    """A window read by another meter than the study's fails the trial: the two do not compare."""
    if study_source and meter_kind(reading.source) != study_source:
        raise RuntimeError(f"this trial's energy came from {reading.source}, the study's from "
                           f"{study_source}: the two do not compare (a GPU lost, a counter unreadable?)")


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
            avg_w=ratio(joules, duration),
            peak_w=max((w for _, w in trace), default=ratio(joules, duration)),
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
