"""Shared fixtures: the project's two environments and the embedded toy Gemma 4."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = PROJECT / ".venvs" / "serve" / "bin" / "python"
MAIN_PYTHON = PROJECT / ".venvs" / "main" / "bin" / "python"


@pytest.fixture(scope="session")
def serve_python() -> str:
    if not SERVE_PYTHON.exists():
        pytest.skip("no serving environment: run ./setup.sh")
    return str(SERVE_PYTHON)


@pytest.fixture(scope="session")
def main_python() -> str:
    if not MAIN_PYTHON.exists():
        pytest.skip("no main environment: run ./setup.sh")
    return str(MAIN_PYTHON)


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory, serve_python) -> Path:
    """The toy checkpoint, built by the serving environment (its transformers writes the processor)."""
    out = tmp_path_factory.mktemp("toy") / "toy-gemma4"
    subprocess.run([serve_python, "-m", "search.toy_model", str(out)], check=True, cwd=PROJECT,
                   capture_output=True)
    return out
