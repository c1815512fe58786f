"""Failed requests never make a trial cheaper: energy is per request served, and more failures than
the study tolerates make the configuration infeasible."""

import pytest

from search import config as cfg
from search.config import Infeasible
from search.trial import require_served
from search.workload import RequestResult


def _results(ok: int, failed: int) -> list[RequestResult]:
    good = [RequestResult(f"ok{i}", "t", "answer", 10, 5, 0.1, 0.01) for i in range(ok)]
    bad = [RequestResult(f"bad{i}", "t", "", 0, 0, 0.1, None, "ReadTimeout: timed out") for i in range(failed)]
    return good + bad


def test_every_request_served_counts_them_all():
    assert require_served(_results(8, 0), 0.0) == 8


def test_one_failure_at_the_default_tolerance_is_infeasible_with_count_and_reason():
    with pytest.raises(Infeasible, match=r"1 of 8 requests failed \(first: ReadTimeout: timed out\)"):
        require_served(_results(7, 1), cfg.WorkloadConfig().max_failed_share)


def test_within_a_tolerance_energy_is_divided_by_the_served_requests_only():
    assert require_served(_results(7, 1), 0.25) == 7
    with pytest.raises(Infeasible):
        require_served(_results(5, 3), 0.25)


def test_tolerance_is_checked_at_the_edge():
    with pytest.raises(cfg.ConfigError, match="max_failed_share"):
        cfg.build({"workload.max_failed_share": 1.0})
