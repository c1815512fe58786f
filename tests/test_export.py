import json

import optuna

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
