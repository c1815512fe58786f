"""Nothing measured twice by accident (search/dedupe.py): the study loop's Objective with the trial
pipeline replaced by a counter (it is not the subject), an in-memory or SQLite Optuna study, no server."""

import io
import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from search import cli, dedupe
from search import space as space_mod
from search import study as study_mod
from search import trial as trial_mod
from search.progress import Progress
from search.summaries import PRESETS_OUTSIDE_SPACE, best_feasible, constraints_of, measured, study_bill

E2E_SPACE = Path(__file__).resolve().parent / "data" / "e2e_space.yaml"  # 3 x 2 = 6 configurations

ENERGY = {"none": 3.0, "fp8_dynamic": 2.0, "w4a16": 1.0}  # w4a16 fails the gate below


@pytest.fixture
def served(monkeypatch):
    """The configurations the stub pipeline served, in order: its energy and recovery depend on the scheme."""
    calls = []

    def run(runtime, config, *args):
        calls.append(config.flat())
        scheme = config.compress.scheme
        margin = -0.1 if scheme == "w4a16" else 0.1
        outcome = trial_mod.Outcome(ENERGY[scheme], 0.8 + margin, margin >= 0,
                                    {"recovery_margin": margin, "energy_j_per_request": ENERGY[scheme],
                                     "recovery_mean": 0.8 + margin, "time_serve_s": 20.0, "spent_serve_j": 200.0},
                                    {"energy_source": "estimate"}, [])
        return trial_mod.TrialRecord(outcome=outcome)

    monkeypatch.setattr(trial_mod, "run", run)
    return calls


def objective(study, tmp_path, presets=None, repeat_measured=False, multi=False):
    logged = []
    tracker = SimpleNamespace(log_trial=logged.append)
    return study_mod.Objective(study, space_mod.load(E2E_SPACE), SimpleNamespace(workdir=tmp_path),
                               trial_mod.Baseline("test", []), tracker,
                               presets or {}, Progress(io.StringIO()), multi, repeat_measured=repeat_measured)


def test_a_configuration_measured_already_is_answered_from_its_trial_and_not_served(served, tmp_path):
    study = optuna.create_study()
    study.enqueue_trial({"compress.scheme": "fp8_dynamic", "workload.verbosity": "terse"})
    study.enqueue_trial({"compress.scheme": "w4a16", "workload.verbosity": "terse"})
    study.enqueue_trial({"compress.scheme": "fp8_dynamic", "workload.verbosity": "terse"})  # trial 0's again
    study.enqueue_trial({"compress.scheme": "w4a16", "workload.verbosity": "terse"})  # trial 1's again
    study.optimize(objective(study, tmp_path), n_trials=4, catch=(study_mod.TrialFailed,))

    assert len(served) == 2  # trials 2 and 3 served nothing
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    for repeat, first in ((2, 0), (3, 1)):
        assert trials[repeat].user_attrs[dedupe.DUPLICATE_OF] == first
        assert trials[repeat].values == trials[first].values  # the sampler sees the measured value ...
        assert trials[repeat].constraints == trials[first].constraints  # ... and whether it passed the gate
        assert trials[repeat].user_attrs["feasible"] == trials[first].user_attrs["feasible"]
        assert trials[repeat].user_attrs["config"] == trials[first].user_attrs["config"]
    assert constraints_of(trials[3])["recovery_gate"] > 0  # w4a16 failed the gate, and its repeat says so
    # Measurements are the trials that ran: the export, the best trial and the bill read those only.
    assert [t.number for t in measured(study)] == [0, 1]
    assert best_feasible(study).number == 0
    assert study_bill(study).stages["serve"].joules == 400.0  # two servings billed, not four
    assert dedupe.duplicates(study) == {2: 0, 3: 1}


def test_a_sampler_proposing_a_small_space_again_and_again_serves_each_configuration_once(served, tmp_path):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective(study, tmp_path), n_trials=20, catch=(study_mod.TrialFailed,))
    configs = [dedupe.config_key(c) for c in served]
    assert len(configs) == len(set(configs)) <= 6  # the space holds 6 configurations
    assert len(dedupe.duplicates(study)) == 20 - len(configs)


def test_the_reference_counts_as_measured_and_repeats_are_served_when_asked(served, tmp_path):
    assert dedupe.REFERENCE_PRESET == study_mod.REFERENCE_PRESET  # the name the study gives the reference's trial
    space = space_mod.load(E2E_SPACE)
    presets = {dedupe.REFERENCE_PRESET: space.reference_config().flat()}
    study = optuna.create_study(directions=["minimize", "maximize"])  # a front sampler's study, too
    study.enqueue_trial(space.enqueue_params(presets[dedupe.REFERENCE_PRESET]),
                        user_attrs={"preset": dedupe.REFERENCE_PRESET})
    study.enqueue_trial({"compress.scheme": "none", "workload.verbosity": "model"})
    study.optimize(objective(study, tmp_path, presets, multi=True), n_trials=2, catch=(study_mod.TrialFailed,))
    reference, again = study.get_trials()
    assert reference.user_attrs["config"] == again.user_attrs["config"]  # the space's reference: none, model
    assert len(served) == 1 and again.user_attrs[dedupe.DUPLICATE_OF] == 0 and again.values == reference.values

    study.enqueue_trial({"compress.scheme": "none", "workload.verbosity": "model"})
    study.optimize(objective(study, tmp_path, presets, repeat_measured=True, multi=True), n_trials=1)
    repeat = study.get_trials()[-1]
    assert len(served) == 2 and dedupe.DUPLICATE_OF not in repeat.user_attrs  # served again: a measurement
    assert dedupe.is_reference(repeat, dedupe.reference_config(study))
    assert not dedupe.is_reference(study.get_trials()[1], None) and dedupe.is_reference(reference, None)


def test_status_says_when_the_best_feasible_trial_is_the_reference(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = study_mod.open_study("ref", url)
    reference = {"compress.scheme": "none", "workload.verbosity": "model"}
    feasible = {"metrics": {"recovery_mean": 1.0}, "feasible": True, "energy_source": "estimate"}
    study.add_trial(optuna.trial.create_trial(value=2.0, user_attrs={
        **feasible, "config": reference, "preset": dedupe.REFERENCE_PRESET}))
    study.add_trial(optuna.trial.create_trial(value=2.5, user_attrs={  # costs more: the reference stays the best
        **feasible, "config": {**reference, "compress.scheme": "fp8_dynamic"}}))
    study.add_trial(optuna.trial.create_trial(value=2.0, user_attrs={
        "config": reference, "feasible": True, dedupe.DUPLICATE_OF: 0}))

    assert cli.main(["status", "--study", "ref", "--storage", url]) == 0
    out = capsys.readouterr().out
    assert "best feasible: trial 0" in out and dedupe.REFERENCE_IS_BEST in out
    assert "1 of the complete trials proposed a configuration measured already" in out
    assert cli.main(["status", "--study", "ref", "--storage", url, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["best_feasible"]["is_reference"] is True and summary["duplicates"] == 1

    study.add_trial(optuna.trial.create_trial(value=1.5, user_attrs={
        **feasible, "config": {**reference, "compress.scheme": "fp8_dynamic", "workload.verbosity": "terse"}}))
    assert cli.main(["status", "--study", "ref", "--storage", url]) == 0
    out = capsys.readouterr().out
    assert "best feasible: trial 3" in out and dedupe.REFERENCE_IS_BEST not in out
    # The duplicate (trial 2) is no measurement: the reference's one price is what the search beat.
    assert "best sampled trial 3 1.5 J/request\n  reference (trial 0) 2 J/request: 25.0% below" in out
    # A seed that runs a value the space never samples is named with it: no sampled trial could match it.
    study.add_trial(optuna.trial.create_trial(value=1.8, user_attrs={
        **feasible, "config": {**reference, "serve.max_num_seqs": 1024}, "preset": "seed_x"}))
    study.set_user_attr(PRESETS_OUTSIDE_SPACE, {"seed_x": {"serve.max_num_seqs": 1024}})
    assert cli.main(["status", "--study", "ref", "--storage", url]) == 0
    assert ("  seed_x (trial 4) 1.8 J/request: 16.7% below  (runs serve.max_num_seqs=1024, which the space "
            "never samples)\n  reference (trial 0) 2 J/request: 25.0% below\n") in capsys.readouterr().out


def test_status_shows_the_best_trials_settings_that_differ_from_the_reference(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = study_mod.open_study("diff", url)
    reference = {"compress.scheme": "none", "serve.max_num_seqs": 64, "workload.verbosity": "model"}
    study.set_user_attr("baseline", {"reference": reference})
    study.add_trial(optuna.trial.create_trial(value=1.5, user_attrs={
        "metrics": {"recovery_mean": 0.9}, "feasible": True, "energy_source": "nvml",
        "config": {**reference, "compress.scheme": "fp8", "serve.max_num_seqs": 128}}))
    assert cli.main(["status", "--study", "diff", "--storage", url]) == 0
    out = capsys.readouterr().out
    assert "settings that differ from the reference (2;" in out
    assert "  compress.scheme = fp8  (reference: none)" in out and "serve.max_num_seqs = 128  (reference: 64)" in out
    assert "workload.verbosity" not in out  # the reference's own setting: not what the search found
