"""The storage runs again what a lost database connection broke: public RDBStorage calls only."""

import optuna
import pytest
import sqlalchemy

from search import study as study_mod


def lost_connection() -> optuna.exceptions.StorageInternalError:
    try:
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    except sqlalchemy.exc.OperationalError as cause:
        try:
            raise optuna.exceptions.StorageInternalError("commit failed") from cause
        except optuna.exceptions.StorageInternalError as exc:
            return exc


def test_a_call_that_lost_its_connection_runs_again():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise lost_connection()
        return "done"

    assert study_mod._ON_LOST_CONNECTION(flaky) == "done" and len(calls) == 2


def test_other_errors_are_raised_at_once(tmp_path):
    storage = study_mod.storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    with pytest.raises(KeyError):  # no such study: raised at once
        storage.get_study_directions(12345)


def test_the_public_calls_are_wrapped_and_no_private_one():
    for name in study_mod._RETRIED_CALLS:
        assert not name.startswith("_")
        assert getattr(study_mod.ReconnectingStorage, name).__wrapped__ is getattr(optuna.storages.RDBStorage, name)
