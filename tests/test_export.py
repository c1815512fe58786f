import json

import optuna
import pytest
import yaml

from search.export import Point, export, figures, pareto_front


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
        assert "vllm serve" in (folder / "README.md").read_text()
    made = figures(study, tmp_path / "fig")
    assert made["pareto"].stat().st_size > 0 and made["history"].stat().st_size > 0


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
