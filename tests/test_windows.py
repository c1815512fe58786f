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


def test_the_objective_reads_the_steady_window_only_when_it_is_long_enough():
    from search.config import WorkloadConfig
    from search.windows import read_objective_window

    def metrics(steady_s):
        return {"energy_j_per_request": 3.0, "steady_energy_j_per_request": 2.5, "steady_window_s": steady_s}

    whole = metrics(1.0)
    read_objective_window(whole, WorkloadConfig())
    assert whole["energy_j_per_request"] == 3.0  # the default reads the whole run
    steady = metrics(6.0)
    read_objective_window(steady, WorkloadConfig(objective_window="steady"))
    assert (steady["energy_j_per_request"], steady["whole_energy_j_per_request"]) == (2.5, 3.0)
    with pytest.raises(RuntimeError, match="lasted 1.0 s, under workload.min_steady_s 5 s"):
        read_objective_window(metrics(1.0), WorkloadConfig(objective_window="steady"))
    with pytest.raises(RuntimeError, match="no steady state"):
        read_objective_window(metrics(0.0), WorkloadConfig(objective_window="steady", min_steady_s=0))
    short_ok = metrics(1.0)
    read_objective_window(short_ok, WorkloadConfig(objective_window="steady", min_steady_s=0.5))
    assert short_ok["energy_j_per_request"] == 2.5
