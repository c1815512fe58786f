"""How requests arrive: the schedule each arrival mode gives, and what it lets be in flight."""

import statistics

import pytest

from search import config as cfg
from search.workload import arrival_offsets


def _workload(**values):
    return cfg.build({f"workload.{k}": v for k, v in values.items()}).workload


def test_all_at_once_and_closed_loop_send_from_the_start():
    assert arrival_offsets(_workload(arrival="all_at_once"), 4) == [0.0] * 4
    assert arrival_offsets(_workload(arrival="concurrency"), 3) == [0.0] * 3
    assert _workload(arrival="all_at_once", n_requests=1024, concurrency=8).max_in_flight == 1024
    assert _workload(arrival="concurrency", n_requests=1024, concurrency=8).max_in_flight == 8


def test_a_poisson_rate_is_seeded_and_has_its_mean_gap():
    rate = _workload(arrival="rate", rate_rps=4.0, seed=3)
    offsets = arrival_offsets(rate, 2000)
    assert offsets == arrival_offsets(rate, 2000)  # every trial gets the same schedule
    assert offsets != arrival_offsets(_workload(arrival="rate", rate_rps=4.0, seed=4), 2000)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.05)


def test_rate_is_checked_at_the_edge():
    with pytest.raises(cfg.ConfigError, match="rate_rps"):
        _workload(arrival="rate", rate_rps=0)
