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


@pytest.fixture(scope="session")
def platform(serve_python, main_python, tmp_path_factory):
    """What this machine and its serving build can run, probed as a study probes it."""
    from search.feasibility import probe
    return probe(serve_python, main_python, tmp_path_factory.mktemp("probe-cache"))


@pytest.fixture(scope="session")
def serves_w4a16(platform):
    """Skips a test whose trials must serve W4A16 where this machine cannot, as the product's own
    check says (vLLM's AVX2 CPU library has no cpu_gemm_wna16: its server dies at the first request)."""
    from search import config as cfg
    from search.feasibility import check
    try:
        check(cfg.build({"compress.scheme": "w4a16"}), platform)
    except cfg.Infeasible as exc:
        pytest.skip(f"its trials serve W4A16, which this machine cannot: {exc}")


AVX2_CPU = PROJECT / "tests" / "data" / "avx2_cpu"


@pytest.fixture(scope="session")
def avx2_env() -> dict[str, str]:
    """Environment under which vLLM's CPU backend sees an AVX2-only CPU (torch's ISA checks answer
    no AVX-512, no AMX): it then loads its AVX2 kernel library and makes its AVX2 decisions, so the
    other CPU kind's path runs on this machine too."""
    import os
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(AVX2_CPU), os.environ.get("PYTHONPATH")]))}


# What starts the serving environment (a server, a probe, the toy's build, a compression beside it).
_HEAVY_FIXTURES = {"serve_python", "toy_model", "platform", "avx2_env", "serves_w4a16"}


def pytest_collection_modifyitems(items):
    """`pytest -m "not slow"` runs what needs no server, compression or study: a developer's loop
    of minutes; CI runs everything."""
    for item in items:
        if item.get_closest_marker("e2e") or _HEAVY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
