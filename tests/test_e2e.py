"""End to end: real llmcompressor, a real vLLM server, a real Optuna SQLite storage and MLflow store."""

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

PROJECT = Path(__file__).resolve().parents[1]
SPACE = PROJECT / "tests" / "data" / "e2e_space.yaml"


def run_cli(home, *args):
    proc = subprocess.run([sys.executable, "-m", "search", *args, "--home", str(home)], cwd=PROJECT,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def study_home(tmp_path_factory, serve_python, main_python):
    home = tmp_path_factory.mktemp("home")
    run_cli(home, "run", "--trials", "3", "--space", str(SPACE), "--warm-start", "seeds",
            "--serve-python", serve_python, "--compress-python", main_python)
    return home


def load(home):
    return optuna.load_study(study_name="gemma4-energy", storage=f"sqlite:///{home / 'optuna.db'}")


def test_warm_start_runs_the_seed_presets_first(study_home):
    trials = load(study_home).get_trials()
    assert [t.user_attrs.get("preset") for t in trials[:3]] == [
        "bf16_reference", "seed_000_bnb_nf4", "seed_001_sparsegpt_gptq_w4a16_fp8kv"]
    states = [t.state for t in trials[:3]]
    assert states[0] == optuna.trial.TrialState.COMPLETE
    # NF4 needs CUDA: recorded as infeasible with its reason, before any work.
    assert trials[1].state == optuna.trial.TrialState.PRUNED and trials[1].user_attrs["infeasible"]
    assert "bitsandbytes" in trials[1].user_attrs["reason"]
    seed_001 = trials[2].user_attrs["config"]
    assert (seed_001["compress.method"], seed_001["compress.prune.base"], seed_001["compress.actorder"]) == (
        "gptq", 0.1, "static")


def test_completed_trials_carry_energy_recovery_and_gate(study_home):
    for t in load(study_home).get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        metrics = t.user_attrs["metrics"]
        assert metrics["energy_j_per_request"] > 0 and t.values[0] == metrics["energy_j_per_request"]
        assert 0 <= metrics["recovery_mean"] <= 1
        assert metrics["recovery_builtin_documents_low"] <= metrics["recovery_builtin_documents"]
        assert t.user_attrs["energy_source"] == "estimate"  # no GPU, no RAPL here: said, not hidden
        assert "feasible" in t.user_attrs
    reference = load(study_home).get_trials()[0]
    assert reference.user_attrs["metrics"]["recovery_mean"] > 0.9  # the baseline model agrees with itself


def test_mlflow_holds_one_child_run_per_trial_with_artifacts(study_home):
    client = MlflowClient(f"sqlite:///{study_home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gemma4-energy")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.data.tags.get("search.study_parent") == "true"]
    children = [r for r in runs if "search.trial" in r.data.tags]
    assert len(parent) == 1 and len(children) == 3
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in children)
    complete = [r for r in children if r.data.tags["state"] == "COMPLETE"]
    for run in complete:
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"recipe.yaml", "vllm_config.yaml", "server.log", "power_trace.csv", "power_trace.png",
                "answers.jsonl"} <= names
        assert run.data.tags["energy_source"] == "estimate" and "ESTIMATE" in run.data.tags["energy_method"]
        assert "compress.scheme" in run.data.params
    infeasible = [r for r in children if r.data.tags["state"] == "INFEASIBLE"]
    assert infeasible and "bitsandbytes" in infeasible[0].data.tags["failure_reason"]
    parent_artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert "pareto.png" in parent_artifacts


def test_resume_continues_numbering_and_status(study_home, serve_python, main_python):
    run_cli(study_home, "run", "--trials", "4", "--space", str(SPACE), "--warm-start", "seeds",
            "--serve-python", serve_python, "--compress-python", main_python)
    trials = load(study_home).get_trials()
    assert [t.number for t in trials if t.state.is_finished()] == [0, 1, 2, 3]
    # Presets are enqueued once per study: the resumed run took the next one, it did not start over.
    assert trials[3].user_attrs["preset"] == "seed_002_fp8_weights_fp8kv"
    status = json.loads(run_cli(study_home, "status", "--json").stdout)
    assert sum(status["counts"][k] for k in ("complete", "pruned", "failed", "infeasible")) == 4
    shown = json.loads(run_cli(study_home, "show", "0").stdout)
    assert shown["user_attrs"]["preset"] == "bf16_reference"
    out = study_home / "front"
    run_cli(study_home, "export", "--out", str(out))
    assert (out / "pareto.csv").exists() and (out / "pareto.json").exists()


def test_trial_over_its_time_budget_fails_and_the_study_goes_on(study_home, serve_python, main_python):
    """A 3 s budget cannot cover a server start: the trial is failed with that reason, the next one runs."""
    run_cli(study_home, "run", "--trials", "6", "--space", str(SPACE), "--trial-timeout", "3",
            "--serve-python", serve_python, "--compress-python", main_python)
    trials = load(study_home).get_trials()
    assert len([t for t in trials if t.state.is_finished()]) == 6
    timed_out = [t for t in trials[4:] if t.state == optuna.trial.TrialState.FAIL]
    assert timed_out and all("time budget of 3 s" in t.user_attrs["reason"] for t in timed_out)


def test_a_trial_pruned_early_keeps_the_energy_of_its_measured_window(tmp_path, serve_python, main_python):
    """At gate 1.0 only a model identical to the reference can pass: the first half of the workload
    prunes seed 001, and the window it measured stays in the record."""
    run_cli(tmp_path, "run", "--trials", "3", "--space", str(SPACE), "--warm-start", "seeds", "--gate", "1.0",
            "--serve-python", serve_python, "--compress-python", main_python)
    seed_001 = load(tmp_path).get_trials()[2]
    assert seed_001.state == optuna.trial.TrialState.PRUNED and not seed_001.user_attrs["infeasible"]
    assert "can reach at most" in seed_001.user_attrs["reason"]
    window = seed_001.user_attrs["stage_times"]
    assert window["first_window_energy_j"] > 0 and window["first_window_energy_j_per_request"] > 0
