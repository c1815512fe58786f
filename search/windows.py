"""The measured windows of one workload run, from request timestamps alone (pure functions).

Two windows per trial: the whole run, and its steady state as the ML.ENERGY benchmark defines it:
from the moment the batch first fills to the moment the drain begins. Here "running" means sent,
first token received and not yet finished, and "full" means the run's peak number of running
requests, which vLLM caps at max_num_seqs. The definition needs nothing but timestamps, so it holds
for every arrival mode (all at once, a closed loop, a Poisson rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    start: float  # on the clock of the request timestamps (time.monotonic)
    end: float
    level: int  # running requests that define it (the steady state's batch size)

    @property
    def duration_s(self) -> float:
        return self.end - self.start


def steady_window(spans: list[tuple[float, float]], max_num_seqs: int) -> Window | None:
    """From (first token, finish) spans of the served requests: the first to the last moment at
    which min(max_num_seqs, peak) requests run at once; None when that span is empty."""
    events = sorted([(t, 1) for t, _ in spans] + [(t, -1) for _, t in spans], key=lambda e: (e[0], e[1]))
    running, peak = 0, 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    level = min(max_num_seqs, peak)
    if level == 0:
        return None
    running, start, end = 0, None, None
    for t, step in events:
        before = running
        running += step
        if before < level <= running and start is None:
            start = t
        if before >= level > running:
            end = t  # the last time the batch drops below full is where the drain begins
    if start is None or end is None or end <= start:
        return None
    return Window(start, end, level)


def tokens_within(token_times: list[list[float]], window: Window) -> int:
    """Streamed tokens whose arrival lies in the window."""
    return sum(1 for times in token_times for t in times if window.start <= t <= window.end)


def share_of_energy(trace: list[tuple[float, float]], trace_start: float, window: Window) -> float:
    """The part of a reading's energy that fell in the window: the power trace's integral over the
    window over its integral over the whole reading (the counter gives the joules, the trace when)."""
    def integral(a: float, b: float) -> float:
        total = 0.0
        for (t0, w0), (t1, w1) in zip(trace, trace[1:]):
            lo, hi = max(t0, a), min(t1, b)
            if hi <= lo:
                continue
            slope = (w1 - w0) / (t1 - t0) if t1 > t0 else 0.0
            total += (hi - lo) * (w0 + slope * ((lo + hi) / 2 - t0))
        return total
    whole = integral(trace[0][0], trace[-1][0]) if len(trace) > 1 else 0.0
    if whole <= 0:
        return math.nan
    return integral(window.start - trace_start, window.end - trace_start) / whole


def inter_token_gaps(token_times: list[list[float]]) -> list[float]:
    """Seconds between consecutive streamed tokens of each request."""
    return [b - a for times in token_times for a, b in zip(times, times[1:])]


def percentiles(values: list[float], name: str, qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles as `{name}_p50` ...; NaN without values."""
    ordered = sorted(values)
    out = {}
    for q in qs:
        rank = math.ceil(q / 100 * len(ordered)) - 1
        out[f"{name}_p{q}"] = ordered[max(0, rank)] if ordered else math.nan
    return out


def steady_metrics(spans: list[tuple[float, float]], token_times: list[list[float]],
                   trace: list[tuple[float, float]], trace_start: float, joules: float, idle_w: float,
                   max_num_seqs: int, tokens_per_answer: float) -> dict[str, float]:
    """The steady state of one measured run, as `steady_*` metrics: its energy is the reading's
    joules times the trace's share in the window; per request, the window's energy per token times
    the run's mean answer length. Only `steady_window_s` = 0 when the run had no steady state."""
    window = steady_window(spans, max_num_seqs)
    if window is None:
        return {"steady_window_s": 0.0}
    tokens = tokens_within(token_times, window)
    energy_j = joules * share_of_energy(trace, trace_start, window)
    per_token = energy_j / tokens if tokens else math.nan
    return {"steady_window_s": window.duration_s, "steady_batch": float(window.level),
            "steady_energy_j": energy_j, "steady_energy_net_j": max(0.0, energy_j - idle_w * window.duration_s),
            "steady_output_tokens": float(tokens), "steady_tokens_per_s": tokens / window.duration_s,
            "steady_energy_j_per_output_token": per_token,
            "steady_energy_j_per_request": per_token * tokens_per_answer}
