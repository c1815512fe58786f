"""Orchestration overhead per trial with 1 and with 3 workers on one study (PostgreSQL + MLflow server).

Each worker count gets a fresh PostgreSQL cluster (search.local_postgres), a local `mlflow server`
and the cheap toy space of the workers test (tests/data/workers_space.yaml). One worker makes the
baseline first (`--trials 0`, not counted), then W workers run the study to --trials finished trials.
Orchestration per trial = (the workers' summed wall time - every trial's compression, serving,
warm-up, workload and quality seconds) / finished trials: Optuna on PostgreSQL, MLflow logging,
heartbeats, process start-up and waiting for the shared storage.

    .venvs/main/bin/python bench/workers_overhead.py --trials 9
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "bench"))

import optuna  # noqa: E402
from summarize_study import stage_seconds  # noqa: E402

from search import local_postgres  # noqa: E402
from search.net import free_port  # noqa: E402
from search.summaries import counts  # noqa: E402

SPACE = PROJECT / "tests" / "data" / "workers_space.yaml"
VENV_BIN = PROJECT / ".venvs" / "main" / "bin"


def wait_http(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def measure(workers: int, trials: int, base: Path) -> dict:
    with local_postgres.cluster(base / "pg") as storage:
        port = free_port()
        mlflow = subprocess.Popen([str(VENV_BIN / "mlflow"), "server", "--backend-store-uri",
                                   f"sqlite:///{base / 'mlflow.db'}", "--artifacts-destination", str(base / "art"),
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/health")
            cmd = [sys.executable, "-m", "search", "worker", "--study", "bench", "--storage", storage,
                   "--space", str(SPACE), "--home", str(base / "home"), "--mlflow-uri", f"http://127.0.0.1:{port}"]
            subprocess.run(cmd + ["--trials", "0"], cwd=PROJECT, check=True, capture_output=True)
            started = time.perf_counter()
            procs = [subprocess.Popen(cmd + ["--trials", str(trials)], cwd=PROJECT, stdout=subprocess.DEVNULL,
                                      stderr=open(base / f"worker{i}.log", "w")) for i in range(workers)]
            walls = []
            for proc in procs:
                if proc.wait() != 0:
                    raise RuntimeError(f"a worker failed; see {base}/worker*.log")
                walls.append(time.perf_counter() - started)
        finally:
            os.killpg(mlflow.pid, signal.SIGTERM)
        study = optuna.load_study(study_name="bench", storage=storage)
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        per_stage, unaccounted = stage_seconds(finished)
        work = sum(per_stage.values()) + unaccounted
        # Each worker's span from its first trial's start to its last one's end: what trials cost
        # besides their stages. The rest of a worker's wall time is paid once per process.
        by_worker: dict[str, list] = {}
        for t in finished:
            by_worker.setdefault(t.user_attrs.get("worker", "?"), []).append(t)
        spans = sum((max(t.datetime_complete for t in ts) - min(t.datetime_start for t in ts)).total_seconds()
                    for ts in by_worker.values())
        return {"workers": workers, "finished_trials": len(finished), "counts": counts(study),
                "wall_s": round(max(walls), 1), "worker_wall_s_sum": round(sum(walls), 1),
                "trial_work_s_sum": round(work, 1),
                "orchestration_s_per_trial": round((sum(walls) - work) / len(finished), 2),
                "orchestration_share": round((sum(walls) - work) / sum(walls), 4),
                "once_per_worker_s": round((sum(walls) - spans) / workers, 1),
                "in_study_orchestration_s_per_trial": round((spans - work) / len(finished), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=9, help="finished trials per study (default: 9)")
    parser.add_argument("--workers", default="1,3", help="worker counts to measure (default: 1,3)")
    args = parser.parse_args()
    for n in (int(w) for w in args.workers.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"workers{n}-") as tmp:
            print(json.dumps(measure(n, args.trials, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
