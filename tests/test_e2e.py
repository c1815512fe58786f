"""End to end: real llmcompressor, a real vLLM server, a real Optuna SQLite storage and MLflow store."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

from search import local_postgres
from search import study as study_mod
from search.summaries import constraints_of, measured
from search_cli import run_cli

pytestmark = pytest.mark.e2e  # studies, servers and compressions: minutes

PROJECT = Path(__file__).resolve().parents[1]
SPACE = PROJECT / "tests" / "data" / "e2e_space.yaml"


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
        "reference", "seed_000_bnb_nf4", "seed_001_sparsegpt_gptq_w4a16_fp8kv"]
    states = [t.state for t in trials[:3]]
    assert states[0] == optuna.trial.TrialState.COMPLETE
    # NF4 needs CUDA: recorded as infeasible with its reason, before any work, as a violated
    # constraint every sampler ranks below the runnable trials.
    assert trials[1].state == optuna.trial.TrialState.COMPLETE and trials[1].user_attrs["infeasible"]
    assert constraints_of(trials[1]) == {"recovery_gate": 1.0, "runs_here": 1.0} and trials[1].values == [float("inf")]
    assert trials[1].system_attrs["constraints"] == [1.0, 1.0]  # the list optuna-dashboard reads
    assert "bitsandbytes" in trials[1].user_attrs["reason"]
    assert constraints_of(trials[0])["runs_here"] == 0.0
    seed_001 = trials[2].user_attrs["config"]
    assert (seed_001["compress.method"], seed_001["compress.prune.base"], seed_001["compress.actorder"]) == (
        "gptq", 0.1, "static")


def test_completed_trials_carry_energy_recovery_and_gate(study_home):
    for t in measured(load(study_home)):
        metrics = t.user_attrs["metrics"]
        assert metrics["energy_j_per_request"] > 0 and t.values[0] == metrics["energy_j_per_request"]
        assert 0 <= metrics["recovery_mean"] <= 1
        assert metrics["recovery_builtin_documents_low"] <= metrics["recovery_builtin_documents"]
        assert t.user_attrs["energy_source"] == "estimate"  # no GPU, no RAPL here: said, not hidden
        # Caches off by default: vLLM's own counters show the measured windows took nothing from one.
        assert metrics["prefix_cache_hit_rate"] == 0.0 and metrics["prefix_cache_queries"] == 0
        assert metrics["failed_requests"] == 0
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
    # Top-level rows (the runs table opens a parent's children folded), linked to the study's run by a tag.
    assert all(r.data.tags["search.study_run"] == parent[0].info.run_id for r in children)
    complete = [r for r in children if r.data.tags["state"] == "COMPLETE"]
    for run in complete:
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"recipe.yaml", "vllm_config.yaml", "server.log", "power_trace.csv", "power_trace.png",
                "answers.jsonl"} <= names
        assert run.data.tags["energy_source"] == "estimate" and "ESTIMATE" in run.data.tags["energy_method"]
        assert "compress.scheme" in run.data.params
    infeasible = [r for r in children if r.data.tags["state"] == "INFEASIBLE"]
    # NF4 everywhere; on a CPU without vLLM's W4A16 kernel, the GPTQ seed too.
    assert any("bitsandbytes" in r.data.tags["failure_reason"] for r in infeasible)
    parent_artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert "pareto.png" in parent_artifacts
    # The search's own bill on the study's run, saying whose meter made it.
    assert parent[0].data.metrics["bill_total_j"] > 0 and parent[0].data.tags["bill_energy_source"] == "estimate"


def test_resume_continues_numbering_and_status(study_home, serve_python, main_python):
    run_cli(study_home, "run", "--trials", "4", "--space", str(SPACE), "--warm-start", "seeds",
            "--serve-python", serve_python, "--compress-python", main_python)
    trials = load(study_home).get_trials()
    assert [t.number for t in trials if t.state.is_finished()] == [0, 1, 2, 3]
    # Presets are enqueued once per study: the resumed run took the next one, it did not start over.
    assert trials[3].user_attrs["preset"] == "seed_002_fp8_weights_fp8kv"
    status = json.loads(run_cli(study_home, "status", "--json").stdout)
    assert sum(status["counts"][k] for k in ("complete", "pruned", "failed", "infeasible")) == 4
    bill = status["bill"]  # every stage the search paid for, the baseline's too, by the study's (estimate) meter
    assert bill["estimate"] and bill["baseline"]["joules"] > 0 and bill["stages"]["compress"]["seconds"] > 0
    assert bill["reference_from"] == "trial 0, which ran the reference configuration" and bill["break_even"]
    shown = json.loads(run_cli(study_home, "show", "0").stdout)
    assert shown["user_attrs"]["preset"] == "reference"
    out = study_home / "front"
    run_cli(study_home, "export", "--out", str(out))
    assert (out / "pareto.csv").exists() and (out / "pareto.json").exists()


def test_trial_over_its_time_budget_fails_and_the_study_goes_on(study_home, serve_python, main_python, serves_w4a16):
    """A 3 s budget cannot cover a server start: the trial is failed with that reason, the next one runs."""
    run_cli(study_home, "run", "--trials", "6", "--space", str(SPACE), "--trial-timeout", "3",
            "--serve-python", serve_python, "--compress-python", main_python)
    trials = load(study_home).get_trials()
    assert len([t for t in trials if t.state.is_finished()]) == 6
    timed_out = [t for t in trials[4:] if t.state == optuna.trial.TrialState.FAIL]
    assert timed_out and all("time budget of 3 s" in t.user_attrs["reason"] for t in timed_out)


def test_a_hopeless_trial_is_pruned_by_the_screen_before_any_energy_is_measured(tmp_path, serve_python, main_python):
    """At gate 1.0 only a model identical to the reference can pass: the quality screen (half the
    items, scored before the measured window) prunes an FP8 trial (a scheme every CPU kind runs),
    so no window is measured for it and the windows of other trials are never split."""
    run_cli(tmp_path, "run", "--trials", "2", "--space", str(SPACE), "--gate", "1.0",
            "--set", "compress.scheme=fp8_dynamic",
            "--serve-python", serve_python, "--compress-python", main_python)
    pruned = load(tmp_path).get_trials()[1]  # trial 0 is the reference
    assert pruned.state == optuna.trial.TrialState.PRUNED and not pruned.user_attrs["infeasible"]
    assert "can reach at most" in pruned.user_attrs["reason"]
    stages = pruned.user_attrs["stage_times"]
    assert stages["pruned_at_screen"] == 1.0 and stages["time_screen_s"] > 0
    assert "time_workload_s" not in stages and not any(k.startswith("energy") for k in stages)
    assert stages["spent_screen_j"] >= 0  # what the screen cost is on the search's bill


def test_a_sigtermed_study_leaves_no_process_nothing_running_and_no_secret(tmp_path, serve_python, main_python,
                                                                          serves_w4a16):
    """SIGTERM (a scheduler, `kill`, a CI time-out) while the trial's vLLM server starts: the run ends
    at once with one line and exit 143, every process it started is gone, no trial and no MLflow run
    is left RUNNING, the trial is retried by the next run. The storage URL carries a password and
    HF_TOKEN is set: neither reaches the terminal or any MLflow param, tag or artifact."""
    if local_postgres.server_binaries() is None:
        pytest.skip("PostgreSQL server binaries not installed (setup.sh installs them as root)")
    password, token = "S3cretPassw0rd", "hf_T0kenForNoLogAtAll"
    home = tmp_path / "home"
    with local_postgres.cluster(tmp_path / "pg") as url:
        storage = url.replace("postgres@", f"postgres:{password}@")  # trust auth: the password is not checked
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"HF_TOKEN": token}
        run = subprocess.Popen(
            [sys.executable, "-m", "search", "run", "--study", "term", "--storage", storage, "--space", str(SPACE),
             "--set", "compress.scheme=w4a16", "--trials", "2", "--home", str(home),
             "--serve-python", serve_python, "--compress-python", main_python],
            cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Trial 0, the reference, runs on the baseline's server; trial 1 starts its own.
        server_log = home / "studies" / "term" / "trial-0001" / "server.log"
        deadline = time.monotonic() + 900
        while not server_log.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert server_log.exists(), run.communicate()[1][-3000:]
        started = psutil.Process(run.pid).children(recursive=True)  # lifelines, vLLM, the compression worker
        assert any("vllm" in " ".join(p.cmdline()) for p in started)
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=120)

        assert run.returncode == 143
        assert [line for line in err.splitlines() if line.strip()][-1].startswith(
            "interrupted by SIGTERM: the running trial is recorded as failed and is retried on the next run")
        _, orphans = psutil.wait_procs(started, timeout=30)
        assert orphans == []
        study = optuna.load_study(study_name="term", storage=url)
        trials = study.get_trials()
        assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
        assert trials[1].user_attrs["reason"] == "interrupted (SIGTERM)" and trials[1].user_attrs["interrupted"]
        assert study_mod.retry_interrupted(study) == 1  # what the next run does first
        queued = study.get_trials()[-1]
        assert queued.state == optuna.trial.TrialState.WAITING and queued.user_attrs["retry_of"] == 1
        assert queued.system_attrs["fixed_params"] == trials[1].params

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("term").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "KILLED"]  # 2 trials', the study's
    texts = [out, err]
    for r in runs:
        texts += [json.dumps(r.data.params), json.dumps(r.data.tags)]
        folder = Path(client.download_artifacts(r.info.run_id, "", str(tmp_path / "art" / r.info.run_id)))
        texts += [f.read_text(errors="replace") for f in folder.rglob("*") if f.is_file()]
    assert len(texts) > 6  # the trial's artifacts came along (server.log, vllm_config.yaml, ...)
    assert not [t for t in texts if password in t or token in t]
    assert "postgres:***@" in json.dumps([r.data.tags.get("storage") for r in runs])
