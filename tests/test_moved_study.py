"""A real study, run from a folder outside the project with a relative home and the example traffic
file as its measured job (issue 27 items 2 and 4), then copied elsewhere and the original moved away:
status, export and MLflow's artifacts all read the copy."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search.traffic import read

pytestmark = pytest.mark.e2e

PROJECT = Path(__file__).resolve().parents[1]
SPACE = PROJECT / "tests" / "data" / "e2e_space.yaml"
EXAMPLE = PROJECT / "objectives" / "traffic" / "example.jsonl"


def search(cwd, *args, timeout_s=1500):
    proc = subprocess.run([sys.executable, "-m", "search", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_a_study_replaying_traffic_is_moved_and_still_read_exported_and_reviewed(tmp_path, serve_python, main_python):
    caller = tmp_path / "caller"
    caller.mkdir()
    # A relative home, from a folder that is not the project's: the toy is built by the project's code.
    search(caller, "run", "--home", "home", "--study", "moved", "--trials", "1", "--space", str(SPACE),
           "--set", "workload.traffic=objectives/traffic/example.jsonl",
           "--serve-python", serve_python, "--compress-python", main_python)
    original = caller / "home"
    study = optuna.load_study(study_name="moved", storage=f"sqlite:///{original / 'optuna.db'}")
    # The run's --set is part of what defines the study: a resume must repeat it, and status names it.
    assert study.user_attrs["definition"]["pinned"] == {"workload.traffic": "objectives/traffic/example.jsonl"}
    reference = study.trials[0]
    assert reference.state == optuna.trial.TrialState.COMPLETE, reference.user_attrs.get("reason")
    # The measured window replayed the file: one request a line, each within its line's cap.
    lines = read(EXAMPLE)
    answers = [json.loads(line) for line in
               (original / "studies" / "moved" / "trial-0000" / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == [f"traffic/line-{r.line}" for r in lines]
    assert not any(a["error"] for a in answers), answers
    caps = [r.max_tokens or 8 for r in lines]  # the e2e space's workload.max_tokens where a line gives none
    assert all(0 < a["completion_tokens"] <= cap for a, cap in zip(answers, caps))
    # Every generated token is streamed and timed (the toy's random weights emit special tokens).
    assert all(a["ttft_s"] is not None for a in answers)
    metrics = reference.user_attrs["metrics"]
    assert metrics["requests"] == len(lines)
    assert metrics["completion_tokens"] == sum(a["completion_tokens"] for a in answers)
    assert "the 6 requests of" in study.user_attrs.get("job", "")

    copy = tmp_path / "elsewhere" / "home-copy"
    shutil.copytree(original, copy, symlinks=True)
    original.rename(tmp_path / "moved-away")
    assert "best feasible: trial 0" in search(tmp_path, "status", "--home", str(copy), "--study", "moved")
    search(tmp_path, "export", "--home", str(copy), "--study", "moved", "--out", "front")
    exported = tmp_path / "front" / "trial-0000"
    assert (exported / "vllm_config.yaml").exists() and f"--home {copy.resolve()}" in (exported / "README.md").read_text()
    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("moved")
    runs = client.search_runs([experiment.experiment_id], "tags.`search.trial` = '0'")
    assert runs and runs[0].info.artifact_uri.startswith((copy / "mlartifacts").resolve().as_uri())
    names = [a.path for a in client.list_artifacts(runs[0].info.run_id)]
    assert "answers.jsonl" in names, names
    downloaded = client.download_artifacts(runs[0].info.run_id, "answers.jsonl", str(tmp_path))
    assert len(Path(downloaded).read_text().splitlines()) == len(lines)
