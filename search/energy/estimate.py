"""Energy estimated from CPU time, where no counter is readable: a declared assumption, not a measurement."""

from __future__ import annotations

from typing import Callable

from search.energy.meter import DEFAULT_SAMPLE_HZ, Meter

# Basis for EstimateMeter's default: an Intel Xeon Platinum 8480+ is rated 350 W TDP for 56 cores
# (Intel ARK), i.e. 6.25 W for each fully busy core. A crude, declared assumption, not a measurement.
WATTS_PER_BUSY_CORE = 350.0 / 56


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
