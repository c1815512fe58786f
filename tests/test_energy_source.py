"""One energy source per study: a trial whose meter differs from the study's fails, saying so."""

from pathlib import Path

import pytest

from search import energy, trial
from search.feasibility import Platform


@pytest.mark.parametrize("study_source, window_source, fails", [
    ("nvml", "nvml", False), ("nvml", "nvml-power", False), ("nvml", "estimate", True), ("rapl", "nvml", True)])
def test_a_window_from_another_meter_than_the_studys_fails_the_trial(study_source, window_source, fails):
    runtime = trial.Runtime(Path("."), Path("."), None, None, None, Platform("cpu", None, None, "", "", "cpu"),
                            None, None, Path("."), energy_source=study_source)
    reading = energy.EnergyReading(window_source, "test", [], 0.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    if fails:
        with pytest.raises(RuntimeError, match="do not compare"):
            trial.check_energy_source(runtime, reading)
    else:
        trial.check_energy_source(runtime, reading)
