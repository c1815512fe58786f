"""The steady-state window and the window maths, checked by hand on small timelines."""

import math

import pytest

from search.windows import Window, inter_token_gaps, percentiles, share_of_energy, steady_window, tokens_within


def test_all_at_once_above_capacity_is_steady_from_full_batch_to_drain():
    # 6 requests at once, max_num_seqs 2: two run at a time; requests are (first token, finish).
    spans = [(1, 3), (1, 3), (3, 5), (3, 5), (5, 7), (5.5, 7.5)]
    window = steady_window(spans, max_num_seqs=2)
    # Full at t=1; last time the running count falls below 2 is at t=7 (the drain).
    assert window == Window(1, 7, 2)


def test_a_batch_below_full_when_the_last_request_starts_is_steady_until_it_was_last_full():
    # A KV cache that holds 4 of max_num_seqs 8: groups of 4 run 0-4 and 4-8; the last 3 start at
    # 8.5, after the batch emptied. Full (4) last held until t=8: the drain began there.
    spans = [(0, 4)] * 4 + [(4, 8)] * 4 + [(8.5, 11)] * 3
    assert steady_window(spans, max_num_seqs=8) == Window(0, 8, 4)


def test_closed_loop_below_capacity_uses_its_own_peak():
    spans = [(0, 4), (1, 5), (2, 6), (4, 8), (5, 9)]  # never more than 3 at once
    window = steady_window(spans, max_num_seqs=64)
    assert window.level == 3 and (window.start, window.end) == (2, 6)


def test_no_overlap_has_a_steady_state_only_if_it_spans_time():
    assert steady_window([], 8) is None
    assert steady_window([(0, 1), (2, 3)], 8) == Window(0, 3, 1)


def test_tokens_and_gaps():
    times = [[0.5, 1.0, 1.5], [2.0, 4.0]]
    assert tokens_within(times, Window(1.0, 2.0, 1)) == 3
    assert inter_token_gaps(times) == [0.5, 0.5, 2.0]


def test_share_of_energy_integrates_the_trace_over_the_window():
    trace = [(0.0, 100.0), (1.0, 100.0), (2.0, 300.0), (3.0, 300.0)]  # 100 + 200 + 300 J
    # Window [1, 2] on the trace clock: the ramp from 100 to 300 W, 200 J of 600.
    assert share_of_energy(trace, trace_start=10.0, window=Window(11.0, 12.0, 1)) == pytest.approx(200 / 600)
    # Half of the ramp, [1, 1.5]: 100 to 200 W, 75 J.
    assert share_of_energy(trace, 10.0, Window(11.0, 11.5, 1)) == pytest.approx(75 / 600)
    assert math.isnan(share_of_energy([(0.0, 5.0)], 0.0, Window(0, 1, 1)))


def test_percentiles_nearest_rank():
    assert percentiles([4, 1, 3, 2], "itl") == {"itl_p50": 2, "itl_p90": 4, "itl_p99": 4}
    assert math.isnan(percentiles([], "ttft")["ttft_p50"])


def test_sustained_service_reads_the_steady_window_only_when_it_is_long_enough():
    from search.config import WorkloadConfig
    from search.windows import read_objective_window

    def metrics(steady_s):
        return {"energy_j_per_request": 3.0, "steady_energy_j_per_request": 2.5, "steady_window_s": steady_s}

    def sustained(**kw):
        return WorkloadConfig(job="sustained", arrival="concurrency", **kw)

    fixed = metrics(6.0)
    read_objective_window(fixed, WorkloadConfig())
    assert fixed["energy_j_per_request"] == 3.0  # the default job is fixed: the whole run
    steady = metrics(6.0)
    read_objective_window(steady, sustained())
    assert (steady["energy_j_per_request"], steady["whole_energy_j_per_request"]) == (2.5, 3.0)
    with pytest.raises(RuntimeError, match="lasted 1.0 s, under workload.min_steady_s 5 s"):
        read_objective_window(metrics(1.0), sustained())
    with pytest.raises(RuntimeError, match="no steady state"):
        read_objective_window(metrics(0.0), sustained(min_steady_s=0))
    short_ok = metrics(1.0)
    read_objective_window(short_ok, sustained(min_steady_s=0.5))
    assert short_ok["energy_j_per_request"] == 2.5


def _closed_loop(n_requests: int, concurrency: int, ramp_s: float, answer_s: float):
    """Requests of a closed loop of `concurrency`: the first ones start one by one over `ramp_s`
    (their prefills queue), each streams for `answer_s`, and a finished one is replaced at once."""
    from search.workload import RequestResult

    free_at = [i * ramp_s / concurrency for i in range(concurrency)]
    out = []
    for i in range(n_requests):
        slot = min(range(concurrency), key=lambda k: free_at[k])
        first, end = free_at[slot] + 0.05, free_at[slot] + answer_s
        free_at[slot] = end
        times = [first + k * (end - first) / 9 for k in range(10)]
        out.append(RequestResult(f"t/{i}", "t", "a", 5, 10, answer_s, 0.05, token_times=times, ended_at=end))
    return out


def _reading_following(results, idle_w: float = 50.0, per_request_w: float = 10.0):
    """A reading whose power is the idle draw plus `per_request_w` for each request streaming."""
    from search.energy import EnergyReading

    end = max(r.ended_at for r in results)
    trace = []
    for k in range(int(end * 20) + 2):
        t = k / 20
        running = sum(1 for r in results if r.token_times[0] <= t <= r.ended_at)
        trace.append((t, idle_w + per_request_w * running))
    joules = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(trace, trace[1:]))
    duration = trace[-1][0]
    return EnergyReading("estimate", "test", [], idle_w, duration, joules, joules, joules / duration,
                         max(w for _, w in trace), trace=trace, started_at=0.0)


def test_a_fixed_job_pays_its_ramp_and_drain_and_sustained_service_is_priced_at_its_load():
    """One run priced as the two jobs: the fixed job pays every joule of the run, ramp-up and drain
    included; sustained service pays its steady state, where the named load of 4 requests runs."""
    from search.config import build
    from search.trial import window_metrics

    results = _closed_loop(n_requests=24, concurrency=4, ramp_s=2.0, answer_s=1.0)
    reading = _reading_following(results)
    load = {"workload.arrival": "concurrency", "workload.concurrency": 4, "serve.max_num_seqs": 8}
    fixed = window_metrics(results, reading, build(load), len(results))
    assert fixed["energy_j_per_request"] == pytest.approx(reading.joules_gross / len(results))
    sustained = window_metrics(results, reading, build({**load, "workload.job": "sustained",
                                                        "workload.min_steady_s": 0.5}), len(results))
    assert sustained["steady_batch"] == 4  # the named load, not max_num_seqs
    # The ramp (requests starting one by one) and the drain run below the load, the idle draw shared by
    # fewer requests: per request they cost more than the steady state, and only the fixed job pays them.
    assert sustained["energy_j_per_request"] < fixed["energy_j_per_request"]
    assert sustained["whole_energy_j_per_request"] == fixed["energy_j_per_request"]


def test_sustained_service_needs_a_named_load_and_each_job_says_what_it_prices():
    from search.config import CombinationError, WorkloadConfig

    with pytest.raises(CombinationError, match="workload.arrival concurrency or rate"):
        WorkloadConfig(job="sustained", arrival="all_at_once")
    assert WorkloadConfig(arrival="all_at_once", n_requests=512).describe_job() == (
        "fixed job: 512 requests sent all at once, priced over the whole run")
    assert WorkloadConfig(job="sustained", arrival="rate", rate_rps=2).describe_job() == (
        "sustained service at 2 requests/s (Poisson), priced per request over the steady state")
