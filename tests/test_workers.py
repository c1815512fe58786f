"""Several workers on one study through a real PostgreSQL: no trial lost or duplicated, a worker
killed with SIGKILL mid-trial has its trial failed by the others and run again."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search import local_postgres
from search.serve import free_port

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
def mlflow_server(tmp_path_factory, main_python):
    base = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen([str(Path(main_python).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{base / 'mlflow.db'}", "--artifacts-destination", str(base / "art"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_port(port, 120)
    yield f"http://127.0.0.1:{port}"
    os.killpg(proc.pid, signal.SIGKILL)


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
    os.killpg(victim.pid, signal.SIGKILL)  # the worker and its vLLM server, no clean-up
    for w in workers[1:]:
        assert w.wait(timeout=1500) == 0, (tmp_path / "w1.log").read_text()[-2000:]

    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    killed = trials[killed_trial]
    assert killed.state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_trial]
    assert len(retries) == 1 and retries[0].state.is_finished()
    assert retries[0].params == killed.params
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) >= 12
    assert len({t.number for t in trials}) == len(trials)  # no number handed out twice
    assert len({t.user_attrs["worker"] for t in finished}) >= 2  # the survivors shared the work

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id], max_results=1000)
    logged = sorted(int(r.data.tags["search.trial"]) for r in runs if "search.trial" in r.data.tags)
    assert logged == sorted(t.number for t in finished + [t for t in trials if t.state == optuna.trial.TrialState.FAIL
                                                          and t.number != killed_trial])
