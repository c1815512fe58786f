"""MLflow tracking: one experiment per study, a parent run per study, a child run per trial.

Writes go through MlflowClient (no global active-run state). When the tracking server cannot be
reached, a trial's record is spooled to disk and sent with the next successful write, so trials
go on and no run is lost.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

_PARENT_TAG = "search.study_parent"
# A tracking server that is away must cost a trial seconds, not MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def redact(value: str) -> str:
    """Database URLs with credentials never reach MLflow."""
    return re.sub(r"(://[^:/@\s]+):[^@\s]+@", r"\1:***@", value)


def _safe(key: str, value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    if any(m in key.lower() for m in ("token", "password", "secret")):
        return "***"
    return redact(text)[:6000]


class Tracker:
    def __init__(self, tracking_uri: str, study_name: str, artifact_root: Path, spool_root: Path):
        self.tracking_uri = tracking_uri
        self.study_name = study_name
        self.artifact_root = artifact_root
        # One spool per worker process, so workers sharing a study folder never send a record twice.
        self.spool_root = spool_root
        self.spool_dir = spool_root / f"{socket.gethostname()}-{os.getpid()}"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri)
        self._experiment_id: str | None = None
        self._parent_id: str | None = None

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.study_name)
            if found is not None:
                self._experiment_id = found.experiment_id
            else:
                self.artifact_root.mkdir(parents=True, exist_ok=True)
                # MLflow 3's UI opens an experiment of no declared kind on its GenAI (traces) pages;
                # this kind opens it on the runs table, where trials are sorted and filtered.
                self._experiment_id = self.client.create_experiment(
                    self.study_name, artifact_location=self.artifact_root.resolve().as_uri(),
                    tags={"mlflow.experimentKind": "custom_model_development"})
        return self._experiment_id

    def parent_run_id(self) -> str:
        if self._parent_id is None:
            runs = self.client.search_runs([self.experiment_id()], f"tags.`{_PARENT_TAG}` = 'true'",
                                           max_results=1)
            if runs:
                self._parent_id = runs[0].info.run_id
            else:
                run = self.client.create_run(self.experiment_id(), run_name=f"study {self.study_name}",
                                             tags={_PARENT_TAG: "true"})
                self._parent_id = run.info.run_id
        return self._parent_id

    def log_study(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        parent = self.parent_run_id()
        self.client.log_batch(parent, params=[Param(k, _safe(k, v)) for k, v in params.items()],
                              tags=[RunTag(k, _safe(k, v)) for k, v in tags.items()])

    def log_trial(self, record: dict[str, Any]) -> None:
        """record: number, params, metrics, tags (with `state`), artifacts (paths). Spooled if MLflow is down."""
        spool = self.spool_dir / f"trial-{record['number']:05d}-{int(time.time() * 1000)}.json"
        spool.write_text(json.dumps(record, default=str))
        self.flush()

    def _adopt_orphans(self) -> None:
        """Records left by a worker of this host that died before sending them become ours."""
        host = socket.gethostname()
        for folder in self.spool_root.glob(f"{host}-*"):
            pid = folder.name.rsplit("-", 1)[-1]
            if folder != self.spool_dir and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                for record in folder.glob("trial-*.json"):
                    record.replace(self.spool_dir / record.name)
                folder.rmdir()

    def flush(self) -> int:
        """Send every spooled trial record; returns how many are still waiting."""
        self._adopt_orphans()
        pending = sorted(self.spool_dir.glob("trial-*.json"))
        for path in pending:
            try:
                self._send(json.loads(path.read_text()))
            except Exception:  # the server is away: keep the record for the next attempt
                return len(list(self.spool_dir.glob("trial-*.json")))
            path.unlink()
        return 0

    def _send(self, record: dict[str, Any]) -> None:
        name = f"trial-{record['number']:03d}"
        existing = self.client.search_runs([self.experiment_id()], f"tags.`search.trial` = '{record['number']}'",
                                           max_results=1)
        if existing:
            run_id = existing[0].info.run_id  # a retried send after a partial write
        else:
            run_id = self.client.create_run(self.experiment_id(), run_name=name, tags={
                "mlflow.parentRunId": self.parent_run_id(), "search.trial": str(record["number"])}).info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in record["metrics"].items()
                   if isinstance(v, (int, float)) and v == v]
        params = [Param(k.replace("/", "_"), _safe(k, v)) for k, v in record["params"].items()]
        tags = [RunTag(k, _safe(k, v)) for k, v in record["tags"].items()]
        for i in range(0, max(len(metrics), len(params), len(tags)), 100):
            self.client.log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100],
                                  tags=tags[i:i + 100])
        for artifact in record["artifacts"]:
            if Path(artifact).exists():
                self.client.log_artifact(run_id, artifact)
        state = record["tags"].get("state")
        self.client.set_terminated(run_id, "FINISHED" if state in ("COMPLETE", "PRUNED", "INFEASIBLE") else "FAILED")

    def log_figures(self, figures: dict[str, Path]) -> None:
        parent = self.parent_run_id()
        for path in figures.values():
            self.client.log_artifact(parent, str(path))


def mlflow_version() -> str:
    return mlflow.__version__
