"""CPU package energy from Linux powercap RAPL counters."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from search.energy.arithmetic import counter_delta
from search.energy.meter import DEFAULT_SAMPLE_HZ, Meter

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
