"""The measured windows of one workload run, from request timestamps alone (pure functions), and
the one the objective reads.

Two windows per trial: the whole run, and its steady state as the ML.ENERGY benchmark defines it:
from the moment the batch first fills to the moment the drain begins. Here "running" means sent,
first token received and not yet finished, and "full" means the number of running requests the
server sustains while it still admits new ones (at most max_num_seqs; fewer when its KV cache
holds fewer). The definition needs nothing but timestamps, so it holds
for every arrival mode (all at once, a closed loop, a Poisson rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from search.errors import SearchError

if TYPE_CHECKING:  # an annotation only: this module stays a leaf
    from search.config import WorkloadConfig


class WindowUnreadable(SearchError, RuntimeError):
    """The objective's window is missing or too short to read: the trial fails, saying which."""


@dataclass(frozen=True)
class Window:
    start: float  # on the clock of the request timestamps (time.monotonic)
    end: float
    level: int  # running requests that define it (the steady state's batch size)

    @property
    def duration_s(self) -> float:
        return self.end - self.start


def steady_window(spans: list[tuple[float, float]], max_num_seqs: int) -> Window | None:
    """From (first token, finish) spans of the served requests: from the moment the batch first
    fills until the last moment it is full (the drain begins there: no later start refills it).

    "Full" is the batch the server sustains while requests are still being admitted: the largest
    count that runs for at least half of that admission period (first to last first token), at most
    max_num_seqs. A momentary peak is not full: a KV cache too small for max_num_seqs holds fewer,
    and a few extra requests in flight for an instant would otherwise leave a window of seconds."""
    if not spans:
        return None
    events = sorted([(t, 1) for t, _ in spans] + [(t, -1) for _, t in spans], key=lambda e: (e[0], e[1]))
    last_start = max(t for t, _ in spans)
    level = min(max_num_seqs, _sustained_level(events, min(t for t, _ in spans), last_start))
    # Events at one instant count together: a request that ends as another starts leaves the batch full.
    counts: dict[float, int] = {}
    for t, step in events:
        counts[t] = counts.get(t, 0) + step
    # The last fall below full, not the first after the last start: a batch that its KV cache keeps
    # below max_num_seqs shrinks and refills by preemption, and can be below full when the last
    # request starts (bf16 under a 22 GiB budget on the H200: 219 running then, full 273).
    running, start, end = 0, None, None
    for t in sorted(counts):
        before = running
        running += counts[t]
        if start is None and before < level <= running:
            start = t
        if start is not None and before >= level > running:
            end = t
    return Window(start, end, level) if end is not None and end > start else None  # end is set only after start


def _sustained_level(events: list[tuple[float, int]], begin: float, end: float) -> int:
    """The largest number of running requests held for at least half of [begin, end]; the peak
    when that span is empty (every request started at once)."""
    held: dict[int, float] = {}
    running, peak, previous = 0, 0, None
    for t, step in events:
        if previous is not None and begin <= previous < end:
            held[running] = held.get(running, 0.0) + min(t, end) - previous
        running += step
        peak = max(peak, running)
        previous = t
    total = sum(held.values())
    if total <= 0:
        return peak
    at_least = 0.0
    for count in sorted(held, reverse=True):
        at_least += held[count]
        if at_least >= total / 2:
            return max(1, count)
    return peak


def tokens_within(token_times: list[list[float]], window: Window) -> int:
    """Streamed tokens whose arrival lies in the window."""
    return sum(1 for times in token_times for t in times if window.start <= t <= window.end)


def trace_joules(trace: list[tuple[float, float]], a: float, b: float) -> float:
    """The integral of a (seconds, watts) power trace from a to b: trapezoids, clipped to [a, b]."""
    total = 0.0
    for (t0, w0), (t1, w1) in zip(trace, trace[1:]):
        lo, hi = max(t0, a), min(t1, b)
        if hi <= lo:
            continue
        slope = (w1 - w0) / (t1 - t0) if t1 > t0 else 0.0
        total += (hi - lo) * (w0 + slope * ((lo + hi) / 2 - t0))
    return total


def share_of_energy(trace: list[tuple[float, float]], trace_start: float, window: Window) -> float:
    """The part of a reading's energy that fell in the window: the power trace's integral over the
    window over its integral over the whole reading (the counter gives the joules, the trace when)."""
    whole = trace_joules(trace, trace[0][0], trace[-1][0]) if len(trace) > 1 else 0.0
    if whole <= 0:
        return math.nan
    return trace_joules(trace, window.start - trace_start, window.end - trace_start) / whole


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


def read_objective_window(metrics: dict[str, float], settings: WorkloadConfig) -> None:
    """Put the job's price per request in `energy_j_per_request`: a fixed job's is the whole run's, as
    measured; sustained service's is its steady state's (the whole run's stays as
    `whole_energy_j_per_request`), and a steady window missing or too short to read fails the trial."""
    if settings.job == "fixed":
        return
    steady_s = metrics.get("steady_window_s") or 0.0
    if not steady_s:
        raise WindowUnreadable("the workload had no steady state to measure: its batch never filled and then "
                               "drained (workload.job sustained needs more requests than the server runs at once)")
    if steady_s < settings.min_steady_s:
        raise WindowUnreadable(f"the steady state lasted {steady_s:.1f} s, under workload.min_steady_s "
                               f"{settings.min_steady_s:g} s: too short to read; more requests or longer answers "
                               "lengthen it")
    metrics["whole_energy_j_per_request"] = metrics["energy_j_per_request"]
    metrics["energy_j_per_request"] = metrics["steady_energy_j_per_request"]


def prefix_cache_counts(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(hit tokens, queried tokens) of vLLM's prefix cache over a window, from the server's
    /metrics counters read at its two ends."""
    return (after.get("vllm:prefix_cache_hits_total", 0.0) - before.get("vllm:prefix_cache_hits_total", 0.0),
            after.get("vllm:prefix_cache_queries_total", 0.0) - before.get("vllm:prefix_cache_queries_total", 0.0))
