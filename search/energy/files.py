"""A reading's files: its power trace as CSV and as a figure."""

from __future__ import annotations

import csv
from pathlib import Path

from search.energy.meter import EnergyReading


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
