"""One energy source per study: a trial whose meter differs from the study's fails, saying so."""

import pytest

from search import energy


@pytest.mark.parametrize("study_source, window_source, fails", [
    ("nvml", "nvml", False), ("nvml", "nvml-power", False), ("nvml", "estimate", True), ("rapl", "nvml", True)])
def test_a_window_from_another_meter_than_the_studys_fails_the_trial(study_source, window_source, fails):
    reading = energy.EnergyReading(window_source, "test", [], 0.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    if fails:
        with pytest.raises(RuntimeError, match="do not compare"):
            energy.check_energy_source(study_source, reading)
    else:
        energy.check_energy_source(study_source, reading)
