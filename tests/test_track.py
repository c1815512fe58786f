"""MLflow logging survives an unreachable tracking server: records wait on disk, none is lost."""

from mlflow.tracking import MlflowClient

from search.track import Tracker, redact


def record(number, tmp_path):
    artifact = tmp_path / f"recipe-{number}.yaml"
    artifact.write_text("default_stage: {}\n")
    return {"number": number, "params": {"compress.scheme": "w4a16", "storage": "postgresql://u:pw@db/x"},
            "metrics": {"energy_j_per_request": 1.5 + number}, "artifacts": [str(artifact)],
            "tags": {"state": "COMPLETE", "feasible": "true"}}


def test_records_wait_while_mlflow_is_away_then_arrive(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    spool = tmp_path / "spool"
    away = Tracker("http://127.0.0.1:9", "s", tmp_path / "art", spool)
    away.log_trial(record(0, tmp_path))
    away.log_trial(record(1, tmp_path))
    assert away.flush() == 2  # nothing sent, nothing dropped

    # The server is back: a tracker over the same spool (the next trial, or a restarted worker) sends all.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    back = Tracker(uri, "s", tmp_path / "art", spool)
    back.spool_dir = away.spool_dir
    assert back.flush() == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    trials = sorted(int(r.data.tags["search.trial"]) for r in runs if "search.trial" in r.data.tags)
    assert trials == [0, 1]
    child = next(r for r in runs if r.data.tags.get("search.trial") == "1")
    assert child.data.metrics["energy_j_per_request"] == 2.5
    assert child.data.params["storage"] == "postgresql://u:***@db/x"  # credentials never reach MLflow
    assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["config.json", "recipe-1.yaml"]
    config = client.download_artifacts(child.info.run_id, "config.json", str(tmp_path))
    assert "postgresql://u:***@db/x" in open(config).read()  # the trial's configuration, redacted too


def test_the_searchs_bill_goes_on_the_studys_parent_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "billed", tmp_path / "art", tmp_path / "spool")
    tracker.log_bill({"bill_total_j": 379.0, "bill_break_even_requests": 758.0},
                     {"bill_break_even": "after 758 requests of the measured workload"})
    assert tracker.flush() == 0
    parent = MlflowClient(uri).get_run(tracker.parent_run_id())
    assert parent.data.metrics == {"bill_total_j": 379.0, "bill_break_even_requests": 758.0}
    assert parent.data.tags["bill_break_even"] == "after 758 requests of the measured workload"


def test_redact(monkeypatch):
    assert redact("postgresql://user:secret@host:5432/db") == "postgresql://user:***@host:5432/db"
    assert redact("sqlite:///x.db") == "sqlite:///x.db"
    # SQLAlchemy alone ends the password at its first @ and would show "u:***@ss@h".
    assert redact("postgresql://u:p@ss@h/db") == "postgresql://u:***@h/db"
    assert redact("postgresql://u@h/db?sslmode=require&password=secret") == (
        "postgresql://u@h/db?sslmode=require&password=***")
    assert redact("error: cannot reach storage postgresql://u:secret@h:9/db: refused") == (
        "error: cannot reach storage postgresql://u:***@h:9/db: refused")
    assert redact("host=h user=u password=secret dbname=x") == "host=h user=u password=*** dbname=x"
    assert redact("http://user:pw@mlflow:5000/api") == "http://user:***@mlflow:5000/api"
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh")
    assert redact("token is hf_abcdefgh") == "token is ***"
