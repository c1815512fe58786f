"""A trial's stages are timed and metered into its record as they end, a failed stage too; a repeat
window is read as the objective is."""

from types import SimpleNamespace

import pytest

from search import energy
from search.config import build
from search import trial
from search.trial import Stages, TrialRecord
from search.workload import RequestResult


class FakeMeter:
    """Each window reads `joules` from meter `source`."""

    def __init__(self, source: str, joules: float):
        self.source, self.joules, self.started = source, joules, 0

    def start(self) -> None:
        self.started += 1

    def stop(self) -> energy.EnergyReading:
        return energy.EnergyReading(self.source, "test", [], 0.0, 1.0, self.joules, self.joules, self.joules,
                                    self.joules)


def test_each_stage_is_shown_and_leaves_its_seconds_and_joules_even_when_it_fails():
    record, shown = TrialRecord(), []
    stages = Stages(record.spent, shown.append, FakeMeter("nvml-power", 12.5), "nvml")
    with stages("check"):
        pass
    with pytest.raises(RuntimeError, match="compression broke"):
        with stages("compress"):
            raise RuntimeError("compression broke")
    assert shown == ["check", "compress"]
    assert set(record.spent) == {"time_check_s", "spent_check_j", "time_compress_s", "spent_compress_j"}
    assert record.spent["spent_compress_j"] == 12.5 and record.spent["time_compress_s"] >= 0
    assert record.outcome is None  # no trial completed


def test_joules_of_another_meter_than_the_studys_stay_out_of_the_record():
    record = TrialRecord()
    with Stages(record.spent, lambda name: None, FakeMeter("estimate", 3.0), "rapl")("serve", "baseline: serve"):
        pass
    assert list(record.spent) == ["time_serve_s"]


def results(n: int) -> list[RequestResult]:
    return [RequestResult(f"t/{i}", "t", "a", 5, 2, 0.5, 0.1, token_times=[0.1, 0.2], ended_at=0.3)
            for i in range(n)]


def reading(source: str, joules: float) -> energy.EnergyReading:
    return energy.EnergyReading(source, "test", [], 0.0, 1.0, joules, joules, joules, joules,
                                trace=[(0.0, joules), (1.0, joules)])


def test_a_repeat_window_is_read_as_the_objective_is_and_from_the_studys_meter(monkeypatch):
    """workload.energy_repeats: each extra window gives its objective J/request per request served;
    a failed request beyond the tolerance, or another meter, fails the trial as in the first window."""
    served = results(4)
    monkeypatch.setattr(trial.workload, "run", lambda url, model, prompts, settings: served)
    server = SimpleNamespace(base_url="http://unused", served_name="m", metrics=lambda: {})
    runtime = SimpleNamespace(energy_source="estimate")
    meter = SimpleNamespace(start=lambda: None, stop=lambda: reading("estimate", 8.0))
    config = build({"workload.energy_repeats": 2})
    assert trial.measure_repeat(runtime, server, meter, [], config) == 2.0
    served[0] = RequestResult("t/0", "t", "", 5, 0, 0.5, None, error="timeout")
    with pytest.raises(trial.Infeasible, match="1 of 4 requests failed"):
        trial.measure_repeat(runtime, server, meter, [], config)
    other = SimpleNamespace(start=lambda: None, stop=lambda: reading("nvml", 8.0))
    with pytest.raises(RuntimeError, match="the two do not compare"):
        trial.measure_repeat(runtime, server, other, [], config)
