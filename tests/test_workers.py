"""Several workers on one study through a real PostgreSQL: no trial lost or duplicated, exactly
--trials finished, a worker killed with SIGKILL mid-trial has its trial failed by the others and run
again and leaves no process behind; MLflow away at start and mid-study loses no record."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

from search import local_postgres, summaries
from search.net import free_port

pytestmark = pytest.mark.e2e  # studies, servers and compressions: minutes

PROJECT = Path(__file__).resolve().parents[1]
SPACE = PROJECT / "tests" / "data" / "workers_space.yaml"


def wait_port(port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"port {port} not open")


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    if local_postgres.server_binaries() is None:
        pytest.skip("PostgreSQL server binaries not installed (setup.sh installs them as root)")
    with local_postgres.cluster(tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture(scope="module")
def mlflow_process(tmp_path_factory, main_python):
    """(process, URL) of a real MLflow tracking server, in a process group of its own."""
    base = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen([str(Path(main_python).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{base / 'mlflow.db'}", "--artifacts-destination", str(base / "art"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_port(port, 120)
    yield proc, f"http://127.0.0.1:{port}"
    os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def mlflow_server(mlflow_process):
    return mlflow_process[1]


def test_three_workers_share_a_study_and_survive_a_sigkill(postgres, mlflow_server, tmp_path, serve_python,
                                                           main_python):
    home = tmp_path / "home"
    cmd = [sys.executable, "-m", "search", "worker", "--study", "shared", "--storage", postgres,
           "--space", str(SPACE), "--home", str(home), "--trials", "12", "--heartbeat", "2",
           "--mlflow-uri", mlflow_server, "--serve-python", serve_python, "--compress-python", main_python]
    # One worker makes the baseline first, so the three start trials together.
    first = subprocess.run(cmd[:cmd.index("--trials") + 1] + ["0"] + cmd[cmd.index("--trials") + 2:],
                           cwd=PROJECT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    workers = [subprocess.Popen(cmd, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"w{i}.log", "w"),
                                start_new_session=True) for i in range(3)]
    victim = workers[0]
    storage = optuna.storages.RDBStorage(postgres)
    deadline = time.monotonic() + 900
    killed_trial = None
    while killed_trial is None and time.monotonic() < deadline:
        study = optuna.load_study(study_name="shared", storage=storage)
        for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            if t.user_attrs.get("worker", "").endswith(f":{victim.pid}"):
                killed_trial = t.number
        time.sleep(0.5)
    assert killed_trial is not None, "the victim never ran a trial"
    # Its vLLM server and compression worker lead sessions of their own: SIGKILL of the worker's
    # group does not reach them, their lifelines must stop them.
    children = psutil.Process(victim.pid).children(recursive=True)
    os.killpg(victim.pid, signal.SIGKILL)  # the worker, no clean-up
    _, orphans = psutil.wait_procs(children, timeout=30)
    assert orphans == [], [p.cmdline()[:4] for p in orphans]
    for w in workers[1:]:
        assert w.wait(timeout=1500) == 0, (tmp_path / "w1.log").read_text()[-2000:]

    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    killed = trials[killed_trial]
    assert killed.state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_trial]
    assert len(retries) == 1 and retries[0].state.is_finished()
    assert retries[0].params == killed.params
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert summaries.finished(optuna.load_study(study_name="shared", storage=storage)) == 12  # exactly --trials
    assert len({t.number for t in trials}) == len(trials)  # no number handed out twice
    assert len({t.user_attrs["worker"] for t in finished}) >= 2  # the survivors shared the work

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id], max_results=1000)
    logged = sorted(int(r.data.tags["search.trial"]) for r in runs if "search.trial" in r.data.tags)
    assert logged == sorted(t.number for t in finished + [t for t in trials if t.state == optuna.trial.TrialState.FAIL
                                                          and t.number != killed_trial])


def test_mlflow_away_at_start_and_mid_study_loses_no_record(mlflow_process, tmp_path, monkeypatch):
    """The tracking server hangs (stopped: its requests time out) before the study's first write,
    and again between two trials. Every record, the study's own included, waits in the spool and
    arrives once; the study's run ends FINISHED. Each away phase sends one read only (the backoff
    holds the rest back), so nothing the stopped server answers late is written twice."""
    from search.track import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server, url = mlflow_process

    def trial(number):
        return {"number": number, "params": {"compress.scheme": "w4a16"}, "metrics": {"energy_j_per_request": 1.0},
                "artifacts": [], "tags": {"state": "COMPLETE"}}

    os.killpg(server.pid, signal.SIGSTOP)
    try:
        tracker = Tracker(url, "away", tmp_path / "art", tmp_path / "spool")
        tracker.log_study({"definition.gate": 0.8}, {"seed": 0})
        tracker.log_trial(trial(0))
        assert len(tracker.pending()) == 2
    finally:
        os.killpg(server.pid, signal.SIGCONT)
    assert tracker.flush(force=True) == 0  # back: the spool replays
    os.killpg(server.pid, signal.SIGSTOP)
    try:
        tracker.log_trial(trial(1))
        assert len(tracker.pending()) == 1
    finally:
        os.killpg(server.pid, signal.SIGCONT)
    assert tracker.close("FINISHED") == 0

    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("away").experiment_id])
    parent, = [r for r in runs if r.data.tags.get("search.study_parent") == "true"]
    assert parent.info.status == "FINISHED" and parent.data.params == {"definition.gate": "0.8"}
    children = sorted((int(r.data.tags["search.trial"]), r.info.status) for r in runs if "search.trial" in r.data.tags)
    assert children == [(0, "FINISHED"), (1, "FINISHED")]
