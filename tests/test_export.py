import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from search import config as cfg
from search import serve
from search.config import ConfigError
from search.export import PROJECT, Point, export, pareto_front
from search.figures import figures
from search.serve import vllm_config
from search.summaries import DUPLICATE_OF, PRESETS_OUTSIDE_SPACE


def test_pareto_front_hand_computed():
    pts = [Point(0, 10.0, 0.95, True), Point(1, 5.0, 0.85, True), Point(2, 6.0, 0.80, True),
           Point(3, 5.0, 0.90, True), Point(4, 2.0, 0.50, False), Point(5, 3.0, 0.40, False),
           Point(6, 12.0, 0.95, True)]
    # Feasible: 3 dominates 1 (same energy, better recovery) and 2; 6 is dominated by 0.
    assert [p.trial for p in pareto_front(pts)] == [3, 0, 4]


def test_export_writes_front_and_deployables(tmp_path):
    study = optuna.create_study()
    rows = [(4.0, 0.9, True), (2.0, 0.85, True), (3.0, 0.80, True), (1.0, 0.3, False)]
    for i, (energy, recovery, feasible) in enumerate(rows):
        workdir = tmp_path / f"trial-{i}"
        workdir.mkdir()
        (workdir / "vllm_config.yaml").write_text("max-num-seqs: 4\n")
        (workdir / "recipe.yaml").write_text("default_stage: {}\n")
        trial = study.ask()
        trial.suggest_categorical("compress.scheme", ["none", "w4a16"])
        for key, value in {"workdir": str(workdir), "feasible": feasible, "energy_source": "estimate",
                           "metrics": {"recovery_mean": recovery}, "config": {"compress.scheme": "w4a16"}}.items():
            trial.set_user_attr(key, value)
        study.tell(trial, energy)
    out = export(study, tmp_path / "front")
    assert [(r["trial"], r["feasible"]) for r in out] == [(1, True), (0, True), (3, False)]
    assert json.loads((tmp_path / "front" / "pareto.json").read_text())[0]["energy_j_per_request"] == 2.0
    assert (tmp_path / "front" / "pareto.csv").read_text().count("\n") == 4
    for row in out:
        folder = tmp_path / "front" / f"trial-{row['trial']:04d}"
        assert (folder / "vllm_config.yaml").exists() and (folder / "recipe.yaml").exists()
        assert "-m vllm.entrypoints.openai.api_server --model checkpoint" in (folder / "README.md").read_text()
    made = figures(study, tmp_path / "fig")
    assert made["pareto"].stat().st_size > 0 and made["history"].stat().st_size > 0


def test_the_export_tables_every_trial_with_its_stages_and_the_reason_one_failed(tmp_path):
    study = optuna.create_study()
    workdir = tmp_path / "trial-0"
    workdir.mkdir()
    (workdir / "vllm_config.yaml").write_text("max-num-seqs: 4\n")
    done = study.ask()
    for key, value in {"workdir": str(workdir), "feasible": True, "energy_source": "nvml", "preset": "reference",
                       "metrics": {"recovery_mean": 1.0, "time_compress_s": 0.0, "time_serve_s": 51.2,
                                   "energy_j": 9.0}}.items():
        done.set_user_attr(key, value)
    study.tell(done, 24.78)
    failed = study.ask()
    failed.set_user_attr("reason", "CompressionFailed: No space left on device")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    again = study.ask()
    again.set_user_attr(DUPLICATE_OF, 0)
    study.tell(again, 24.78)
    export(study, tmp_path / "out")
    with open(tmp_path / "out" / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["trial", "state", "origin", "energy_j_per_request", "feasible", "recovery_mean",
                             "time_compress_s", "time_serve_s", "trial_s", "reason"]
    assert (rows[0]["origin"], rows[0]["energy_j_per_request"], rows[0]["time_serve_s"]) == ("reference", "24.78", "51.2")
    assert (rows[1]["state"], rows[1]["origin"], rows[1]["energy_j_per_request"]) == ("FAIL", "sampled", "")
    assert rows[1]["reason"] == "CompressionFailed: No space left on device"
    assert (rows[2]["origin"], rows[2]["energy_j_per_request"]) == ("sampled, answered from trial 0", "24.78")


def test_an_export_under_a_memory_budget_pins_the_kv_cache_it_had_not_the_hosts_share(tmp_path):
    """20 GiB of an 80 GiB H100 is utilization 0.25; on a 24 GB L4 that would leave vLLM 6 GB. The
    export writes the KV cache the trial's server sized instead, which means the same on either card."""
    workdir = tmp_path / "trial-0"
    workdir.mkdir()
    (workdir / "vllm_config.yaml").write_text("gpu-memory-utilization: 0.2511\nmax-num-seqs: 64\n")
    (workdir / "server.log").write_text(
        "(EngineCore pid=1) INFO 12-06 17:25:12 [gpu_worker.py:560] Available KV cache memory: 9.65 GiB\n")
    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_categorical("compress.scheme", ["none"])
    for key, value in {"workdir": str(workdir), "feasible": True, "energy_source": "nvml", "gpu": "NVIDIA H100 80GB HBM3",
                       "metrics": {"recovery_mean": 1.0},
                       "config": {"compress.scheme": "none", "serve.memory_budget_gib": 20.0}}.items():
        trial.set_user_attr(key, value)
    study.tell(trial, 25.5)
    export(study, tmp_path / "front")
    engine = yaml.safe_load((tmp_path / "front" / "trial-0000" / "vllm_config.yaml").read_text())
    assert "gpu-memory-utilization" not in engine and engine["kv-cache-memory-bytes"] == int(9.65 * 2**30)
    readme = (tmp_path / "front" / "trial-0000" / "README.md").read_text()
    assert "measured on NVIDIA H100 80GB HBM3 under a 20 GiB memory budget" in readme and "9.65 GiB" in readme


def test_a_chosen_trial_is_exported_even_off_the_front_and_an_unmeasured_one_is_refused(tmp_path):
    study = optuna.create_study()
    (tmp_path / "vllm_config.yaml").write_text("max-num-seqs: 4\n")
    for energy, recovery in ((1.0, 1.0), (2.0, 0.9)):  # the second is dominated: off the front
        trial = study.ask()
        trial.suggest_categorical("compress.scheme", ["none"])
        for key, value in {"workdir": str(tmp_path), "feasible": True, "energy_source": "estimate",
                           "metrics": {"recovery_mean": recovery}, "config": {"compress.scheme": "none"}}.items():
            trial.set_user_attr(key, value)
        study.tell(trial, energy)
    assert [r["trial"] for r in export(study, tmp_path / "front")] == [0]
    assert [r["trial"] for r in export(study, tmp_path / "chosen", [1])] == [1]
    with pytest.raises(ValueError, match="no measured trial 7"):
        export(study, tmp_path / "none", [7])


def _one_trial_study(storage: str, workdir: Path, config: dict, name: str = "s") -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage)
    study.set_user_attr("model", "toy")
    trial = study.ask()
    trial.suggest_categorical("compress.scheme", [config.get("compress.scheme", "none")])
    for key, value in {"workdir": str(workdir), "feasible": True, "energy_source": "estimate",
                       "metrics": {"recovery_mean": 1.0}, "config": config}.items():
        trial.set_user_attr(key, value)
    study.tell(trial, 3.0)
    return study


def test_an_export_whose_trial_files_are_missing_says_so_and_writes_nothing(tmp_path):
    study = _one_trial_study(None, tmp_path / "gone" / "trial-0000", {"compress.scheme": "none"})
    with pytest.raises(ConfigError, match=r"the files of trial 0 are missing \(no vllm_config.yaml in .*gone"):
        export(study, tmp_path / "front")
    assert not (tmp_path / "front").exists()


def test_an_exported_point_carries_its_servers_environment_and_request_settings(tmp_path):
    """The README's commands name the project's own environments by absolute path (they run from any
    folder), start vLLM as the product does (the module: the CPU build has no `vllm` metadata), with
    the variables the trial's server had, and give the request settings no server can default."""
    home = tmp_path / "home"
    workdir = home / "studies" / "s" / "trial-0000"
    workdir.mkdir(parents=True)
    config = {"compress.scheme": "none", "serve.distributed_executor_backend": "uni", "serve.fp8_kernel": "marlin",
              "workload.quality": "fidelity", "workload.max_tokens": 12}
    engine = vllm_config(cfg.build(config).serve, cfg.build(config).compress)
    (workdir / "vllm_config.yaml").write_text(yaml.safe_dump(engine))
    study = _one_trial_study(None, workdir, config)
    export(study, tmp_path / "front", home=home)
    folder = tmp_path / "front" / "trial-0000"
    env = json.loads((folder / "server_env.json").read_text())
    # No server_env.json in the trial's folder (a trial from before it was written): what its config implies.
    assert env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_TEST_FORCE_FP8_MARLIN": "1",
                   "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    request = json.loads((folder / "request.json").read_text())
    assert request["max_tokens"] == 12 and request["skip_special_tokens"] is False and request["ignore_eos"] is True
    readme = (folder / "README.md").read_text()
    assert f"{PROJECT}/.venvs/main/bin/python -m search compress --home {home.resolve()} --model toy" in readme
    assert (f"env VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_TEST_FORCE_FP8_MARLIN=1 VLLM_USE_FLASHINFER_SAMPLER=0 "
            f"{PROJECT}/.venvs/serve/bin/python -m vllm.entrypoints.openai.api_server --model checkpoint "
            f"--config {folder.resolve()}/vllm_config.yaml") in readme
    assert "vllm serve" not in readme and '"skip_special_tokens": false' in readme
    # A recorded environment wins, less the study's machine-local compile caches.
    (workdir / "server_env.json").write_text(json.dumps({"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_CACHE_ROOT": "/x",
                                                         "TRITON_CACHE_DIR": "/x/t", "A": "1"}))
    export(study, tmp_path / "front", home=home)
    assert json.loads((folder / "server_env.json").read_text()) == {"A": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0"}


def test_a_servers_launch_records_the_environment_it_adds(tmp_path, monkeypatch):
    started = {}

    class Process:
        pid = 0

        def __init__(self, cmd, env, **kwargs):
            started.update(env=env)

    monkeypatch.setattr(serve.subprocess, "Popen", Process)
    serve.launch("python", tmp_path, {"distributed-executor-backend": "uni"}, tmp_path, {"X": "1"})
    recorded = json.loads((tmp_path / "server_env.json").read_text())
    assert recorded == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "X": "1"}
    assert all(started["env"][k] == v for k, v in recorded.items())


def test_a_study_folder_copied_elsewhere_is_read_exported_and_reviewed_from_the_copy(tmp_path):
    """A finished study's home (Optuna, MLflow with its artifacts, the trial folders) copied to another
    folder, the original moved away: status, export and MLflow's artifacts all read the copy."""
    from mlflow.tracking import MlflowClient
    original = tmp_path / "original"
    workdir = original / "studies" / "s" / "trial-0000"
    workdir.mkdir(parents=True)
    (workdir / "vllm_config.yaml").write_text("max-num-seqs: 4\n")
    (workdir / "recipe.yaml").write_text("# no compression\n")
    _one_trial_study(f"sqlite:///{original / 'optuna.db'}", workdir, {"compress.scheme": "none"})
    client = MlflowClient(f"sqlite:///{original / 'mlflow.db'}")
    experiment = client.create_experiment("s", artifact_location=(original / "mlartifacts").resolve().as_uri())
    run = client.create_run(experiment).info.run_id
    client.log_artifact(run, str(workdir / "recipe.yaml"))
    client.set_terminated(run)
    copy = tmp_path / "elsewhere" / "home-copy"
    shutil.copytree(original, copy)
    original.rename(tmp_path / "moved-away")  # nothing may still read the original's folder
    caller = tmp_path / "caller"
    caller.mkdir()

    def search(*args):
        proc = subprocess.run([sys.executable, "-m", "search", *args, "--home", str(copy), "--study", "s"],
                              cwd=caller, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    assert "best feasible: trial 0" in search("status")
    search("export", "--out", "front")
    exported = caller / "front" / "trial-0000"
    assert (exported / "recipe.yaml").read_text() == "# no compression\n"
    assert f"--home {copy.resolve()}" in (exported / "README.md").read_text()
    # Review: the copy's MLflow store names the copy's artifacts, and they are there.
    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    info = client.get_run(run).info
    assert info.artifact_uri.startswith((copy / "mlartifacts").resolve().as_uri())
    assert client.get_experiment(experiment).artifact_location == (copy / "mlartifacts").resolve().as_uri()
    assert [a.path for a in client.list_artifacts(run)] == ["recipe.yaml"]
    assert Path(client.download_artifacts(run, "recipe.yaml", str(tmp_path))).read_text() == "# no compression\n"
    # A folder whose trial files were left behind fails the export, naming them.
    shutil.rmtree(copy / "studies")
    proc = subprocess.run([sys.executable, "-m", "search", "export", "--home", str(copy), "--study", "s", "--out", "f2"],
                          cwd=caller, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "the files of trial 0 are missing" in proc.stderr


def _measured(study, tmp_path, energy, **attrs):
    """A complete trial with its folder (export reads each chosen trial's vllm_config.yaml)."""
    workdir = tmp_path / f"trial-{len(study.trials)}"
    workdir.mkdir()
    (workdir / "vllm_config.yaml").write_text("max-num-seqs: 4\n")
    trial = study.ask()
    for key, value in {"workdir": str(workdir), "energy_source": "nvml", **attrs}.items():
        trial.set_user_attr(key, value)
    study.tell(trial, energy)


def test_the_best_sampled_trial_is_set_against_every_preset_it_was_given(tmp_path):
    """Issue 25's goal reads off versus.csv: the best sampled trial's price against each seed's."""
    study = optuna.create_study()
    study.set_user_attr(PRESETS_OUTSIDE_SPACE, {"seed_b": {"serve.max_num_seqs": 1024}})
    for preset, energy, feasible in [("reference", 25.0, True), ("seed_a", 20.0, True), ("seed_b", 17.5, True),
                                     (None, 18.0, True), (None, 14.0, True), (None, 10.0, False),
                                     ("seed_c", 12.0, False)]:
        _measured(study, tmp_path, energy, feasible=feasible, metrics={"recovery_mean": 0.9},
                  **({"preset": preset} if preset else {}))
    export(study, tmp_path / "out")
    with open(tmp_path / "out" / "versus.csv") as handle:
        rows = list(csv.DictReader(handle))
    # Infeasible trials (10.0 sampled, 12.0 seed_c) are neither the best found nor a preset to beat.
    assert [(r["preset"], r["best_sampled_trial"]) for r in rows] == [("seed_b", "4"), ("seed_a", "4"), ("reference", "4")]
    assert [round(float(r["best_sampled_change"]), 4) for r in rows] == [-0.2, -0.3, -0.44]
    # A preset that runs a value the space never samples says so: the search could not match it there.
    assert [r["outside_space"] for r in rows] == ["serve.max_num_seqs=1024", "", ""]


def test_no_versus_table_before_a_sampled_trial_is_measured(tmp_path):
    study = optuna.create_study()
    _measured(study, tmp_path, 25.0, feasible=True, preset="reference", metrics={"recovery_mean": 1.0})
    export(study, tmp_path / "out")
    assert (tmp_path / "out" / "trials.csv").exists() and not (tmp_path / "out" / "versus.csv").exists()
