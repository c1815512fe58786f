"""MLflow tracking: one experiment per study, a parent run per study, a child run per trial.

Writes go through MlflowClient (no global active-run state), and every one of them, the study's
own at start-up included, goes through a spool on disk: the record is written there first, then
sent, then deleted. A tracking server that cannot be reached costs nothing but a retry later (with
a growing pause between attempts); the records wait and are sent in order once it is back, by
this worker or by the next one on this host. Only a spool that cannot be written (a full disk,
after retries) is an error, `TrackingFailed`, which fails the trial it was for.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import tenacity

from search.redaction import redact
from search.review import KEY_METRICS
from search.errors import SearchError
from search.retries import after_pauses

_PARENT_TAG = "search.study_parent"
# A tracking server that is away must cost a trial seconds, not MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
SPOOL_RETRY_S = (0.2, 0.5, 1.0, 2.0)  # pauses between attempts to write a record to the spool
SEND_BACKOFF_S = (5.0, 300.0)  # first and longest pause after a failed send
_TEXT_ARTIFACTS = {".log", ".txt", ".yaml", ".yml", ".json", ".jsonl", ".csv"}


class TrackingFailed(SearchError, RuntimeError):
    """A record could not even be written to the local spool; the trial it belongs to fails."""


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
        from mlflow.tracking import MlflowClient  # here, not at import: the CLI's input checks stay fast
        self.client = MlflowClient(tracking_uri)
        self._experiment_id: str | None = None
        self._parent_id: str | None = None
        self._sequence = 0
        self._send_after = 0.0  # monotonic time before which no send is tried (after a failure)
        self._pause_s = SEND_BACKOFF_S[0]

    # --- what the study records --------------------------------------------------------------

    def log_study(self, params: dict[str, Any], tags: dict[str, Any]) -> None:
        """The parent run's params (what defines the study: never changes) and tags (this run's)."""
        self._record({"kind": "study", "params": params, "tags": tags})

    def log_trial(self, record: dict[str, Any]) -> None:
        """record: number, params, metrics, tags (with `state`), artifacts (paths); and what its run is
        described against (search/review.py): start_ms, gate, reference, reference_j. It ends now."""
        self._record({"kind": "trial", "end_ms": int(time.time() * 1000), **record})

    def log_review(self, view: dict[str, Any]) -> None:
        """The study at a glance (search/review.py's study_view) on the parent run and the experiment."""
        self._record({"kind": "review", **view})

    def log_figures(self, figures: dict[str, Path]) -> None:
        self._record({"kind": "figures", "paths": [str(p) for p in figures.values()]})

    def log_bill(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        """The search's bill (search/bill.py) on the parent run; a later run's replaces it."""
        self._record({"kind": "bill", "metrics": metrics, "tags": tags})

    def close(self, status: str) -> int:
        """The parent run ends with `status` (FINISHED, FAILED or KILLED); returns the records still
        waiting for the server (sent by the next run)."""
        self._record({"kind": "end", "status": status})
        return self.flush(force=True)

    # --- the spool ------------------------------------------------------------------------------

    def _record(self, record: dict[str, Any]) -> None:
        self._spool(record)
        self.flush()

    def _spool(self, record: dict[str, Any]) -> Path:
        self._sequence += 1
        name = f"{time.time_ns():020d}-{self._sequence:06d}-{record['kind']}.json"
        path, partial = self.spool_dir / name, self.spool_dir / f".{name}.tmp"
        text = json.dumps(record, default=str)

        def write() -> Path:
            try:
                partial.write_text(text)
                partial.replace(path)  # a record is whole or absent, never half written
            except OSError:
                partial.unlink(missing_ok=True)
                raise
            return path

        try:
            return after_pauses(SPOOL_RETRY_S, tenacity.retry_if_exception_type(OSError))(write)
        except OSError as exc:
            raise TrackingFailed(f"MLflow record not written to {self.spool_dir}: "
                                 f"{type(exc).__name__}: {exc}") from None

    def pending(self) -> list[Path]:
        return sorted(self.spool_dir.glob("*.json"))

    def _adopt_orphans(self) -> None:
        """Records left by a worker of this host that died before sending them become ours."""
        host = socket.gethostname()
        for folder in self.spool_root.glob(f"{host}-*"):
            pid = folder.name.rsplit("-", 1)[-1]
            if folder != self.spool_dir and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                for record in folder.glob("*.json"):
                    record.replace(self.spool_dir / record.name)
                shutil.rmtree(folder, ignore_errors=True)

    def flush(self, force: bool = False) -> int:
        """Send the spooled records in order; returns how many are still waiting. After a failed
        send the next attempts wait, 5 s at first, doubling up to 5 min, unless `force`d."""
        if not force and time.monotonic() < self._send_after:
            return len(self.pending())
        self._adopt_orphans()
        for path in self.pending():
            try:
                self._send(json.loads(path.read_text()))
            except Exception:  # the server is away: the record waits for the next attempt
                self._send_after = time.monotonic() + self._pause_s
                self._pause_s = min(2 * self._pause_s, SEND_BACKOFF_S[1])
                return len(self.pending())
            path.unlink()
        self._pause_s = SEND_BACKOFF_S[0]
        return 0

    # --- MLflow ---------------------------------------------------------------------------------

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

    def _send(self, record: dict[str, Any]) -> None:
        kind = record.get("kind", "trial")  # spools written before kinds existed hold trials only
        if kind == "trial":
            self._send_trial(record)
            return
        from mlflow.entities import Metric, Param, RunTag
        parent = self.parent_run_id()
        if kind == "study":
            self.client.update_run(parent, "RUNNING")
            self.client.log_batch(parent, params=[Param(k, _safe(k, v)) for k, v in record["params"].items()],
                                  tags=[RunTag(k, _safe(k, v)) for k, v in record["tags"].items()])
        elif kind == "bill":
            now = int(time.time() * 1000)
            self.client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in record["metrics"].items()],
                                  tags=[RunTag(k, _safe(k, v)) for k, v in record["tags"].items()])
        elif kind == "figures":
            for path in record["paths"]:
                if Path(path).exists():
                    self._log_artifact(parent, path)
        elif kind == "review":
            self.client.update_run(parent, name=record["name"])
            self.client.log_batch(parent, metrics=[Metric(k, float(v), int(time.time() * 1000), 0)
                                                   for k, v in record["metrics"].items()],
                                  tags=[RunTag(k, _safe(k, v)) for k, v in record["tags"].items()])
            self._log_table(parent, record["table"], "trials.json")
            note = record["experiment_note"].replace("{experiment_id}", self.experiment_id())
            self.client.set_experiment_tag(self.experiment_id(), "mlflow.note.content", note[:5000])
            from search.review import VIEW_TAG, answer_view
            self.client.set_experiment_tag(self.experiment_id(), VIEW_TAG, json.dumps(answer_view()))
        elif kind == "end":
            self.client.set_terminated(parent, record["status"])

    def _send_trial(self, record: dict[str, Any]) -> None:
        """A trial's run, a top-level row of the runs table (not a child of the study's run, which the
        table opens collapsed), named with what it found (search/review.py), timed as the trial ran."""
        from mlflow.entities import Metric, Param, RunTag
        from search.review import trial_view
        view = trial_view(record)
        # `search.study_run` links the study's run; the runs table shows the trials, not one folded row.
        existing = self.client.search_runs([self.experiment_id()], f"tags.`search.trial` = '{record['number']}'",
                                           max_results=1)
        if existing:
            run_id = existing[0].info.run_id  # a retried send after a partial write
            self.client.update_run(run_id, name=view["name"])
        else:
            run_id = self.client.create_run(self.experiment_id(), start_time=record.get("start_ms"),
                                            run_name=view["name"], tags={
                "search.study_run": self.parent_run_id(), "search.trial": str(record["number"])}).info.run_id
        now = record.get("end_ms") or int(time.time() * 1000)
        values = {**record["metrics"], **view["metrics"]}
        # The answer's metrics first: a run's page lists its metrics in the order they were logged.
        ordered = [k for k in KEY_METRICS if k in values] + [k for k in values if k not in KEY_METRICS]
        metrics = [Metric(k, float(values[k]), now, 0) for k in ordered
                   if isinstance(values[k], (int, float)) and values[k] == values[k]]
        params = [Param(k.replace("/", "_"), _safe(k, v)) for k, v in record["params"].items()]
        tags = [RunTag(k, _safe(k, v)) for k, v in {**record["tags"], **view["tags"]}.items()]
        for i in range(0, max(len(metrics), len(params), len(tags)), 100):
            self.client.log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100],
                                  tags=tags[i:i + 100])
        if record["params"]:
            self.client.log_dict(run_id, {k: json.loads(json.dumps(v, default=str)) if not isinstance(v, str)
                                          else _safe(k, v) for k, v in record["params"].items()}, "config.json")
        for artifact in record["artifacts"]:
            if Path(artifact).exists():
                self._log_artifact(run_id, artifact)
        # Pruned and infeasible trials end KILLED (stopped before their measurement), failed ones FAILED.
        self.client.set_terminated(run_id, view["status"], end_time=record.get("end_ms"))

    def _log_table(self, run_id: str, columns: dict[str, list], name: str) -> None:
        """A table artifact as MLflow's log_table writes one (pandas' "split" JSON, listed in the run's
        `mlflow.loggedArtifacts` tag, which the UI shows as a table), replaced, not appended to as
        log_table does with an existing file (each run of the study logs the whole table again)."""
        names = list(columns)
        rows = [list(row) for row in zip(*(columns[n] for n in names))]
        self.client.log_dict(run_id, {"columns": names, "data": rows}, name)
        run = self.client.get_run(run_id)
        listed = json.loads(run.data.tags.get("mlflow.loggedArtifacts", "[]"))
        if {"path": name, "type": "table"} not in listed:
            listed.append({"path": name, "type": "table"})
            self.client.set_tag(run_id, "mlflow.loggedArtifacts", json.dumps(listed))

    def _log_artifact(self, run_id: str, path: str) -> None:
        """Text artifacts (logs, configs, answers) go up with any credential in them hidden."""
        source = Path(path)
        if source.suffix not in _TEXT_ARTIFACTS:
            self.client.log_artifact(run_id, path)
            return
        with tempfile.TemporaryDirectory() as folder:
            copy = Path(folder) / source.name
            copy.write_text(redact(source.read_text(errors="replace")))
            self.client.log_artifact(run_id, str(copy))


def mlflow_version() -> str:
    import mlflow
    return mlflow.__version__
