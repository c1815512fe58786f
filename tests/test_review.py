"""The study reads at a glance (issue 28): a small study through the real study loop (Objective,
run, Tracker on an SQLite MLflow store, SQLite Optuna storage) with the trial pipeline replaced by a
stub (it is not the subject), then read back as MLflow's UI and optuna-dashboard read it.

MLflow 3.17's runs table shows, until a user picks more, Run Name, Created, Dataset, Duration, Source
and Models (its default `selectedColumns` are Source, Models and Dataset beside the fixed ones), the
status icon, and the experiment's description above the table."""

import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from mlflow.tracking import MlflowClient

from objectives.recovery import Gate
from search import review
from search import space as space_mod
from search import study as study_mod
from search import trial as trial_mod
from search.progress import Progress
from search.summaries import constraints_of
from search.track import Tracker

E2E_SPACE = Path(__file__).resolve().parent / "data" / "e2e_space.yaml"
STUB_S = 0.3  # each stub trial takes this long: its run's duration must show it
# scheme, verbosity -> what the stub pipeline does with that configuration
ENERGY = {"none": 3.0, "fp8_dynamic": 2.0, "w4a16": 1.0}


def stub_run(runtime, config, workdir, *args):
    time.sleep(STUB_S)
    workdir.mkdir(parents=True, exist_ok=True)
    scheme, verbosity = config.compress.scheme, config.workload.verbosity
    if (scheme, verbosity) == ("w4a16", "model"):
        (workdir / "server.log").write_text("INFO vLLM server started\n")
        (workdir / "screen_answers.jsonl").write_text('{"id": "a", "text": "42"}\n')
        raise trial_mod.TrialPruned("recovery cannot reach the gate: at most 0.41 after 8 of 16 items")
    if (scheme, verbosity) == ("fp8_dynamic", "model"):
        raise space_mod.Infeasible("fp8_dynamic needs a GPU of capability 8.9 (this machine has none)")
    if (scheme, verbosity) == ("none", "terse"):
        raise RuntimeError("the server died in warm-up")
    margin = -0.2 if scheme == "w4a16" else 0.1
    recovery = 0.8 + margin
    outcome = trial_mod.Outcome(ENERGY[scheme], recovery, margin >= 0,
                                {"recovery_margin": margin, "energy_j_per_request": ENERGY[scheme],
                                 "recovery_mean": recovery, "time_serve_s": 20.0, "spent_serve_j": 200.0},
                                {"energy_source": "estimate", "energy_method": "CPU time x 10 W"}, [])
    return trial_mod.TrialRecord(outcome=outcome)


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """Six trials: the reference (feasible, 3 J), fp8 terse (feasible, 2 J: the best), w4a16 terse
    (1 J, below the gate), w4a16 model (pruned at the screen), fp8 model (infeasible), none terse (failed)."""
    home = tmp_path_factory.mktemp("home")
    patch = pytest.MonkeyPatch()
    patch.setattr(trial_mod, "run", stub_run)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = space_mod.load(E2E_SPACE)
    storage = f"sqlite:///{home / 'optuna.db'}"
    study = study_mod.open_study("glance", storage, "tpe")
    study.set_user_attr("gate_threshold", 0.8)
    presets = {f"p{i}": {"compress.scheme": s, "workload.verbosity": v} for i, (s, v) in enumerate(
        [("fp8_dynamic", "terse"), ("w4a16", "terse"), ("w4a16", "model"), ("fp8_dynamic", "model"),
         ("none", "terse")])}
    runtime = SimpleNamespace(workdir=home / "studies" / "glance", pool=SimpleNamespace(discard=lambda: None),
                              slos={}, gate=Gate(threshold=0.8),
                              reference=SimpleNamespace(workload=SimpleNamespace(describe_job=lambda: "a fixed job")))
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}", "glance", home / "mlartifacts", home / "spool")
    baseline = trial_mod.Baseline("test", [], reference=space.reference_config().flat())
    options = study_mod.RunOptions(6, None, "seeds", presets, storage_url=storage, stop_rule=None)
    try:
        study_mod.run(study, space, runtime, baseline, tracker, options, Progress(io.StringIO()))
        assert tracker.close("FINISHED") == 0
    finally:
        patch.undo()
    return home, study


def runs_by_trial(home):
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("glance")
    runs = client.search_runs([experiment.experiment_id])
    return client, experiment, runs, {int(r.data.tags["search.trial"]): r for r in runs if "search.trial" in r.data.tags}


def test_each_trials_row_says_its_state_energy_recovery_and_verdict(small_study):
    home, study = small_study
    client, _, runs, trials = runs_by_trial(home)
    assert sorted(trials) == [0, 1, 2, 3, 4, 5]
    # Every trial is a row of its own at the top level: none is folded under the study's run.
    assert not any("mlflow.parentRunId" in r.data.tags for r in runs)
    names = {n: r.info.run_name for n, r in trials.items()}
    assert names[0].startswith("trial-000 PASS 3 J/request (estimate) = 1.00x ref, recovery 0.900 >= gate 0.8")
    assert "the reference's settings" in names[0]
    assert names[1].startswith("trial-001 PASS 2 J/request (estimate) = 0.67x ref, recovery 0.900 >= gate 0.8 | ")
    assert "scheme=fp8_dynamic" in names[1] and "verbosity=terse" in names[1]
    assert names[2].startswith("trial-002 BELOW GATE 1 J/request (estimate) = 0.33x ref, recovery 0.600 < gate 0.8")
    assert names[3].startswith("trial-003 PRUNED: recovery cannot reach the gate: at most 0.41")
    assert names[4].startswith("trial-004 INFEASIBLE: fp8_dynamic needs a GPU")
    assert names[5].startswith("trial-005 FAILED: RuntimeError: the server died in warm-up")
    # The status icon: pruned and infeasible trials stopped before their measurement, failed ones failed.
    assert [trials[n].info.status for n in range(6)] == ["FINISHED", "FINISHED", "FINISHED", "KILLED", "KILLED",
                                                         "FAILED"]
    # Duration is the trial's own time, not the moment its run was written after it.
    for n, run in trials.items():
        trial = study.trials[n]
        assert run.info.end_time - run.info.start_time >= STUB_S * 1000 * 0.9
        assert abs(run.info.start_time - trial.datetime_start.timestamp() * 1000) < 1000
    # The same answers as tags and metrics, for the columns a user adds and for filters.
    assert trials[2].data.tags["verdict"] == "BELOW GATE" and trials[2].data.tags["recovery_vs_gate"] == (
        "recovery 0.600 < gate 0.8")
    assert trials[1].data.metrics["energy_vs_reference"] == pytest.approx(2 / 3)
    assert "**trial 1: PASS**" in trials[1].data.tags["mlflow.note.content"]
    # A run's page lists its metrics as logged: the answer's first.
    assert list(trials[1].data.metrics)[:4] == ["energy_j_per_request", "energy_vs_reference", "recovery_mean",
                                                "recovery_margin"]


def test_a_pruned_trial_keeps_what_it_produced(small_study):
    home, _ = small_study
    client, _, _, trials = runs_by_trial(home)
    names = {a.path for a in client.list_artifacts(trials[3].info.run_id)}
    assert {"config.json", "server.log", "screen_answers.jsonl"} <= names
    config = json.load(open(client.download_artifacts(trials[3].info.run_id, "config.json", str(home))))
    assert config["compress.scheme"] == "w4a16"


def test_the_study_run_and_the_experiment_name_the_best_feasible_trial(small_study):
    home, _ = small_study
    client, experiment, runs, _ = runs_by_trial(home)
    parent = next(r for r in runs if r.data.tags.get("search.study_parent") == "true")
    assert parent.info.run_name == "study glance: best trial-001 2 J/request (estimate) (-33.3% energy vs reference)"
    assert parent.data.tags["best_trial"] == "1"
    assert parent.data.metrics["best_saving_vs_reference"] == pytest.approx(1 / 3)
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**Best feasible: trial 1**, 2 J/request (estimate), 33.3% less energy than the "
                           "reference's 3 J/request") and "Break-even of the search: " in note
    assert parent.data.tags["break_even"] == parent.data.tags["bill_break_even"]
    # The experiment's description, shown above the runs table, says the same, with the sorted view.
    described = client.get_experiment(experiment.experiment_id).tags["mlflow.note.content"]
    assert described.startswith("**Best feasible: trial 1**")
    assert f"#/experiments/{experiment.experiment_id}/runs?orderByKey=metrics.%60energy_j_per_request%60" in described
    # ... and MLflow's own shared view: sorted by energy, the answer's columns beside the default ones.
    assert f"#/experiments/{experiment.experiment_id}/runs?viewStateShareKey=answer" in described
    view = json.loads(client.get_experiment(experiment.experiment_id).tags["mlflow.sharedViewState.answer"])
    assert view["orderByKey"] == "metrics.`energy_j_per_request`" and view["orderByAsc"] is True
    assert {"tags.`verdict`", "metrics.`recovery_mean`", "tags.`energy_source`"} <= set(view["selectedColumns"])
    # The parent's table: every trial, feasible ones first by energy.
    table = json.load(open(client.download_artifacts(parent.info.run_id, "trials.json", str(home))))
    trial_column = table["columns"].index("trial")
    assert [row[trial_column] for row in table["data"]] == [1, 0, 2, 3, 4, 5]


def test_optuna_names_the_objective_with_its_unit_and_keeps_constraint_names(small_study):
    _, study = small_study
    assert study.metric_names == ["energy per request [J]"]
    assert constraints_of(study.trials[2]) == {"recovery_gate": pytest.approx(0.2), "runs_here": 0.0}
    assert constraints_of(study.trials[4]) == {"recovery_gate": 1.0, "runs_here": 1.0}


def test_optuna_dashboard_reads_each_trials_feasibility(small_study):
    """optuna-dashboard's own API (its WSGI app, as `optuna-dashboard sqlite:///...` serves it): a
    trial below the gate and an infeasible one show violated constraints, a feasible one none."""
    dashboard = pytest.importorskip("optuna_dashboard")
    from wsgiref.util import setup_testing_defaults

    home, study = small_study
    app = dashboard.wsgi(f"sqlite:///{home / 'optuna.db'}")

    def get(path):
        environ = {"PATH_INFO": path, "QUERY_STRING": "after=0", "REQUEST_METHOD": "GET"}
        setup_testing_defaults(environ)
        status = []
        body = b"".join(app(environ, lambda s, h, *a: status.append(s)))
        assert status[0].startswith("200"), status
        return json.loads(body)

    study_id = optuna.storages.RDBStorage(f"sqlite:///{home / 'optuna.db'}").get_study_id_from_name(study.study_name)
    detail = get(f"/api/studies/{study_id}")
    assert detail["objective_names"] == ["energy per request [J]"]
    constraints = {t["number"]: t["constraints"] for t in detail["trials"]}
    feasible = {n: all(v <= 0 for v in c) for n, c in constraints.items() if c}
    assert feasible == {0: True, 1: True, 2: False, 4: False}  # as the dashboard's `constraints.every(v <= 0)`
    assert constraints[2] == [pytest.approx(0.2), 0.0]  # recovery_gate, runs_here


def test_review_rows_of_a_study_match_the_runs(small_study):
    _, study = small_study
    view = review.from_study(study)
    assert view["tags"]["best_trial"] == "1" and view["table"]["trial"] == [1, 0, 2, 3, 4, 5]


def test_figures_carry_units_the_gate_and_the_evaluator_used(small_study, tmp_path, monkeypatch):
    from search import figures as figures_mod
    _, study = small_study
    texts = {}
    save = figures_mod._save

    def keep_text(fig, path):
        texts[path.name] = " ".join(t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text")))
        return save(fig, path)

    monkeypatch.setattr(figures_mod, "_save", keep_text)
    made = figures_mod.figures(study, tmp_path)
    assert {"pareto", "history"} <= set(made)
    assert "energy per request [J], an ESTIMATE" in texts["pareto.png"] and "gate: recovery >= 0.8" in texts["pareto.png"]
    assert "mean recovery [fraction of the reference's quality]" in texts["pareto.png"]
    assert "energy per request [J]" in texts["history.png"] and "recovery < gate 0.8" in texts["history.png"]
    assert "pruned (no energy measured)" in texts["history.png"] and "infeasible (no energy measured)" in texts["history.png"]
    # The importances name the evaluator that computed them, from the evaluator itself.
    importances, evaluator = figures_mod.importances_of(study.trials[:3] * 2)
    assert figures_mod.evaluator_label(evaluator) == "PED-ANOVA, top 10% of trials"
    assert type(evaluator) is type(optuna.importance.PedAnovaImportanceEvaluator())


def test_the_trials_table_is_replaced_when_the_study_runs_again(small_study):
    home, study = small_study
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}", "glance", home / "mlartifacts", home / "spool-again")
    tracker.log_review(review.from_study(study))
    assert tracker.flush() == 0
    client, _, runs, _ = runs_by_trial(home)
    parent = next(r for r in runs if r.data.tags.get("search.study_parent") == "true")
    table = json.load(open(client.download_artifacts(parent.info.run_id, "trials.json", str(home / "again"))))
    assert len(table["data"]) == 6  # not 12: MLflow's log_table would have appended
    assert json.loads(parent.data.tags["mlflow.loggedArtifacts"]) == [{"path": "trials.json", "type": "table"}]


def test_a_study_made_with_named_constraint_keys_goes_on_with_them():
    """GP compares the names of every trial's constraints: a study whose trials hold Optuna 5's named
    keys (made before the list) keeps them; a new study stores the list optuna-dashboard reads."""
    from search.summaries import set_constraints
    old = optuna.create_study()
    trial = old.ask()
    trial.set_constraint("recovery_gate", -0.1)
    trial.set_constraint("runs_here", 0.0)
    old.tell(trial, 1.0)
    trial = old.ask()
    set_constraints(trial, {"runs_here": 0.0, "recovery_gate": 0.2})
    old.tell(trial, 2.0)
    assert old.trials[1].constraints == {"recovery_gate": 0.2, "runs_here": 0.0}
    assert "constraints" not in old.trials[1].system_attrs

    new = optuna.create_study()
    trial = new.ask()
    set_constraints(trial, {"slo_ttft_p90_ms": -3.0, "runs_here": 0.0, "recovery_gate": 0.2})
    new.tell(trial, 2.0)
    assert new.trials[0].system_attrs["constraints"] == [0.2, 0.0, -3.0]  # gate, runs_here, latency limits
    assert constraints_of(new.trials[0]) == {"recovery_gate": 0.2, "runs_here": 0.0, "slo_ttft_p90_ms": -3.0}
    assert list(new.trials[0].constraints.values()) == [0.2, 0.0, -3.0]  # what the samplers read
