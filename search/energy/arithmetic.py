"""The arithmetic of energy readings, pure functions testable without hardware: counter deltas,
integrals of power traces, energy net of idle, a window's flat metrics and the spread of repeats."""

from __future__ import annotations

import math
import statistics


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


def ratio(num: float, den: float) -> float:
    """num / den, NaN when den is 0."""
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
    avg_w = ratio(gross_j, duration_s)
    return {
        "energy_j": gross_j,
        "energy_net_j": net_of_idle(gross_j, idle_w, duration_s),
        "energy_j_per_request": ratio(gross_j, n_requests),
        "energy_j_per_output_token": ratio(gross_j, output_tokens),
        "tokens_per_wh": ratio(output_tokens, gross_j / 3600.0),
        "avg_power_w": avg_w,
        "peak_power_w": max((w for _, w in trace), default=avg_w),
        "idle_power_w": idle_w,
        "window_s": duration_s,
    }


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, range and relative std of repeated windows."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "rel_std": ratio(std, mean)}
