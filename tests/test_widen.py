"""A study carried into a wider space (search/widen.py, `search widen`): the study loop's Objective
with the trial pipeline replaced by a stub (it is not the subject), SQLite Optuna studies, no server."""

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search import cli, dedupe
from search import config as cfg
from search import space as space_mod
from search import study as study_mod
from search import trial as trial_mod
from search import widen as widen_mod
from search.progress import Progress

E2E_SPACE = Path(__file__).resolve().parent / "data" / "e2e_space.yaml"  # verbosity: model or terse
SEED = {"compress.scheme": "fp8_dynamic", "workload.verbosity": "terse"}  # outside the narrow space below


@pytest.fixture
def served(monkeypatch):
    """The configurations the stub pipeline served, in order."""
    calls = []

    def run(runtime, config, *args):
        calls.append(config.flat())
        energy = {"none": 3.0, "fp8_dynamic": 2.0, "w4a16": 1.0}[config.compress.scheme]
        outcome = trial_mod.Outcome(energy, 0.9, True, {"recovery_margin": 0.1, "energy_j_per_request": energy,
                                                         "recovery_mean": 0.9, "time_serve_s": 20.0},
                                    {"energy_source": "estimate"}, [])
        return trial_mod.TrialRecord(outcome=outcome)

    monkeypatch.setattr(trial_mod, "run", run)
    return calls


def space_file(tmp_path, name, **changes):
    """e2e_space.yaml with some of its params or fixed settings changed."""
    data = yaml.safe_load(E2E_SPACE.read_text())
    for key, value in changes.items():
        section = "params" if key in data["params"] else "fixed"
        data[section][key.replace("__", ".")] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_trials(study, space, tmp_path, presets, n_trials, then=None):
    """The reference and the presets, then `then` (parameters enqueued as a sampled trial's)."""
    presets = study_mod.with_reference(space, presets)
    study_mod.warm_start(study, space, presets)
    if then:
        study.enqueue_trial(then)
    objective = study_mod.Objective(study, space, SimpleNamespace(workdir=tmp_path), trial_mod.Baseline("test", []),
                                    SimpleNamespace(log_trial=lambda record: None), presets,
                                    Progress(io.StringIO()), False)
    study.optimize(objective, n_trials=n_trials, catch=(study_mod.TrialFailed,))


@pytest.fixture
def narrow_study(tmp_path, served):
    """Three trials of a space that samples verbosity 'model' only: the reference, a seed whose
    'terse' lies outside it, and a trial of FP8 (no preset: as a sampled one)."""
    space = space_mod.load(space_file(tmp_path, "narrow", **{"workload.verbosity": {"choices": ["model"]}}))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = study_mod.open_study("narrow", url)
    study.set_user_attr("definition", {"space": space.digest(), "gate": 0.8, "choices_here": {"x": [1]}})
    run_trials(study, space, tmp_path, {"seed_terse": SEED}, 3,
               then={"compress.scheme": "fp8_dynamic", "workload.verbosity": "model"})
    return study, url


def test_the_trials_are_carried_with_their_prices_and_the_seed_gains_the_value_the_space_now_samples(
        narrow_study, tmp_path, served):
    source, url = narrow_study
    wide = space_mod.load(E2E_SPACE)
    target = study_mod.open_study("wide", url)
    widen_mod.widen(source, target, wide, widen_mod.carried_trials(source, wide))

    before, after = source.get_trials(), target.get_trials()
    assert [t.number for t in after] == [0, 1, 2]
    assert [(t.state, t.values, t.duration, t.user_attrs) for t in after] == \
        [(t.state, t.values, t.duration, t.user_attrs) for t in before]
    seed = after[1]
    assert seed.user_attrs["preset"] == "seed_terse"
    assert "workload.verbosity" not in before[1].params  # the narrow space could not hold it
    assert seed.params["workload.verbosity"] == "terse"
    assert seed.distributions["workload.verbosity"].choices == ("model", "terse")
    definition = target.user_attrs["definition"]
    assert definition == {"space": wide.digest(), "gate": 0.8}  # the space's choices are said by the next run
    assert target.user_attrs[widen_mod.WIDENED_FROM] == {"study": "narrow", "space": source.user_attrs[
        "definition"]["space"], "trials": 3}
    assert target.user_attrs["warm_started"] == source.user_attrs["warm_started"]

    # The carried trials are the new study's measurements: the seed's configuration, sampled again in
    # the wide space, is answered from its trial, not served.
    served.clear()
    target.enqueue_trial({"compress.scheme": "fp8_dynamic", "workload.verbosity": "terse"})
    run_trials(target, wide, tmp_path, {"seed_terse": SEED}, 1)
    assert served == []
    assert target.trials[3].user_attrs[dedupe.DUPLICATE_OF] == 1


def test_a_space_that_would_run_another_job_or_cannot_sample_a_trial_is_refused_naming_it(narrow_study, tmp_path):
    source, _ = narrow_study
    other_job = space_mod.load(space_file(tmp_path, "other", workload__max_tokens=16))
    with pytest.raises(cfg.ConfigError, match=r"^trial 0 ran workload.max_tokens=8 \(the space fixes 16\)"):
        widen_mod.carried_trials(source, other_job)
    fewer = space_mod.load(space_file(tmp_path, "fewer", **{"compress.scheme": {"choices": ["none", "w4a16"]}}))
    # The seed (trial 1) runs its FP8 as a preset does, outside the space; trial 2 was sampled there.
    with pytest.raises(cfg.ConfigError, match=r"^trial 2 ran compress.scheme='fp8_dynamic', which .* never samples"):
        widen_mod.carried_trials(source, fewer)


def test_a_study_with_a_trial_running_is_refused(tmp_path):
    study = study_mod.open_study("busy", f"sqlite:///{tmp_path / 'optuna.db'}")
    study.ask()
    with pytest.raises(cfg.ConfigError, match=r"has trials not finished \(0\)"):
        widen_mod.carried_trials(study, space_mod.load(E2E_SPACE))


def test_the_command_copies_once_and_a_refusal_leaves_no_study(narrow_study, tmp_path, capsys):
    _, url = narrow_study
    common = ["--home", str(tmp_path), "--study", "narrow"]
    other_job = space_file(tmp_path, "other", workload__max_tokens=16)
    assert cli.main(["widen", *common, "--into", "wide", "--space", str(other_job)]) == 2
    assert capsys.readouterr().err.startswith("error: trial 0 ran workload.max_tokens=8")
    assert optuna.get_all_study_names(url) == ["narrow"]

    (tmp_path / "studies" / "narrow").mkdir(parents=True)
    (tmp_path / "studies" / "narrow" / "baseline-0123.json").write_text('{"answers": []}')
    assert cli.main(["widen", *common, "--into", "wide", "--space", str(E2E_SPACE)]) == 0
    said = capsys.readouterr().out
    assert "3 trials of narrow (complete 3) copied into wide" in said
    # The reference's answers go with the trials: the new study's first run does not serve them again.
    assert "the reference's answers (baseline-0123.json) were copied" in said
    assert (tmp_path / "studies" / "wide" / "baseline-0123.json").read_text() == '{"answers": []}'
    assert cli.main(["widen", *common, "--into", "wide", "--space", str(E2E_SPACE)]) == 2
    assert "--into wide: that study exists already" in capsys.readouterr().err
    assert [t.state for t in study_mod.load_study("wide", url).trials] == [TrialState.COMPLETE] * 3


def test_the_export_finds_a_carried_trials_folder_under_the_study_that_ran_it(tmp_path):
    from search.export import trial_dir
    ran_at = tmp_path / "home" / "studies" / "narrow" / "trial-0002"
    ran_at.mkdir(parents=True)
    trial = SimpleNamespace(number=2, user_attrs={"workdir": "/gpu-machine/product/studies/narrow/trial-0002"})
    assert trial_dir(trial, SimpleNamespace(study_name="wide"), tmp_path / "home") == ran_at


def test_the_sets_a_studys_runs_pinned_are_recorded_named_by_a_refused_resume_and_repeated_by_widen(
        tmp_path, served, capsys):
    pinned = {"workload.max_tokens": 16}  # the space fixes 8
    narrow = space_mod.load(space_file(tmp_path, "narrow", **{"workload.verbosity": {"choices": ["model"]}}))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = study_mod.open_study("pinned", url)
    study.set_user_attr("definition", {"space": narrow.pinned(pinned).digest(), "pinned": pinned})
    run_trials(study, narrow.pinned(pinned), tmp_path, {}, 1)
    common = ["--home", str(tmp_path), "--study", "pinned"]

    pythons = ["--serve-python", sys.executable, "--compress-python", sys.executable]
    assert cli.main(["run", *common, "--space", str(E2E_SPACE), "--set", "workload.max_tokens=32",
                     "--warm-start", "none", *pythons]) == 2
    assert "pinned {'workload.max_tokens': 16} -> {'workload.max_tokens': 32}" in capsys.readouterr().err

    assert cli.main(["status", *common]) == 0
    assert "its runs pinned: --set workload.max_tokens=16" in capsys.readouterr().out

    # No --set given: the recorded ones are the trials' (without them the reference, run at 16, is refused).
    assert cli.main(["widen", *common, "--into", "wide", "--space", str(E2E_SPACE)]) == 0
    said = capsys.readouterr().out
    assert f"--study wide --space {E2E_SPACE} --set workload.max_tokens=16`" in said
    # The new study's first run records its own (checked there against the trials' configurations).
    assert "pinned" not in study_mod.load_study("wide", url).user_attrs["definition"]
