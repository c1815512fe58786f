"""A study folder (the home: optuna.db, mlflow.db, mlartifacts/, studies/, cache/) that was moved or
copied still reads, exports and reviews.

Optuna's storage URL is made from the home each time (sqlite:///HOME/optuna.db), and trial folders
are found under the home by name (search/export.py's trial_dir). MLflow keeps absolute artifact URIs
(file:///OLD/mlartifacts/...) in its tables: `follow_move` re-roots those of the home's own store onto
the home as it is now, so that `mlflow ui --backend-store-uri sqlite:///HOME/mlflow.db` shows the
copy's artifacts (a copy would otherwise show the original's, and a moved folder none). It touches
nothing when the home has not moved, and only a local MLflow store in the home.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

ARTIFACTS = "mlartifacts"
# MLflow's tables and the columns that hold an artifact URI (MLflow 3; a table a version lacks is skipped).
_URI_COLUMNS = (("experiments", "artifact_location", "experiment_id"), ("runs", "artifact_uri", "run_uuid"),
                ("logged_models", "artifact_location", "model_id"))


def _old_root(uri: str) -> str | None:
    """'file:///old/home/mlartifacts/abc/artifacts' -> 'file:///old/home/mlartifacts'."""
    marker = f"/{ARTIFACTS}"
    if not uri.startswith("file://") or marker not in uri:
        return None
    head, _, tail = uri.partition(marker)
    return head + marker if tail == "" or tail.startswith("/") else None


def follow_move(home: Path) -> dict[str, int]:
    """Re-root the artifact URIs of HOME/mlflow.db that point at another folder's mlartifacts onto
    HOME/mlartifacts. Returns {table: rows changed} (empty when nothing moved)."""
    home = Path(home).resolve()
    database, artifacts = home / "mlflow.db", home / ARTIFACTS
    if not database.is_file() or not artifacts.is_dir():
        return {}
    here = artifacts.as_uri()
    changed: dict[str, int] = {}
    try:
        connection = sqlite3.connect(database, timeout=30)
    except sqlite3.Error:
        return {}
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, column, key in _URI_COLUMNS:
            if table not in tables:
                continue
            rows = connection.execute(f"SELECT {key}, {column} FROM {table}").fetchall()
            updates = []
            for row_key, uri in rows:
                old = _old_root(uri or "")
                if old and old != here:
                    updates.append((here + uri[len(old):], row_key))
            if updates:
                connection.executemany(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", updates)
                changed[table] = len(updates)
        connection.commit()
    except sqlite3.Error:  # not MLflow's store, or locked past the timeout: the command goes on, as before
        return {}
    finally:
        connection.close()
    return changed
