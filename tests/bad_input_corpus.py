"""The bad-input corpus (tests/data/bad_inputs/cases.yaml) as the test and the benchmark run it:
each case is `python -m search ...` from the project root, in a home and an environment of its own."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
DATA = PROJECT / "tests" / "data" / "bad_inputs"
CASES = DATA / "cases.yaml"
# What the tool reads from the environment: unset unless a case sets it, so that the caller's shell
# does not change what a case means.
TOOL_VARIABLES = ("SEARCH_HOME", "SEARCH_SERVE_PYTHON", "SEARCH_COMPRESS_PYTHON", "SEARCH_GPUS_FILE",
                  "MLFLOW_TRACKING_URI", "HF_TOKEN")
STUDY = "kept"  # the study a `home: study` case's database holds


class _UniqueKeys(yaml.SafeLoader):
    """A case that names a key twice is a mistake in the corpus (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicated = sorted({key for key in keys if keys.count(key) > 1})
        if duplicated:
            raise ValueError(f"{CASES} line {node.start_mark.line + 1}: {duplicated} given twice")
        return super().construct_mapping(node, deep)


def cases() -> list[dict]:
    return yaml.load(CASES.read_text(), Loader=_UniqueKeys)


def make_study_db(path: Path) -> None:
    """An Optuna database holding the empty study STUDY, made as the tool makes one."""
    import warnings
    from search import study as study_mod
    study_mod.quiet_optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's notes on its experimental options
        study_mod.open_study(STUDY, f"sqlite:///{path}")


@dataclass
class Outcome:
    argv: list[str]
    returncode: int
    stderr: str
    elapsed_s: float
    cpu_s: float  # the child's user + system time: what the refusal costs, however busy the machine is
    home_before: str
    home_after: str


def _state(home: Path) -> str:
    """What a home holds (names and contents), to tell that a refusal left it as it was."""
    if not home.exists():
        return "missing"
    if home.is_file():
        return "file " + hashlib.sha256(home.read_bytes()).hexdigest()
    return " ".join(f"{p.relative_to(home)}:{hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else 'dir'}"
                    for p in sorted(home.rglob("*"))) or "empty"


def run_case(case: dict, tmp: Path, study_db: Path | None = None, python: str = sys.executable) -> Outcome:
    """Prepare the case's home and environment under `tmp` (a folder of its own) and run it."""
    home = tmp / "home"
    kind = case.get("home", "missing")
    if kind == "empty":
        home.mkdir()
    elif kind == "file":
        home.write_text("not a folder\n")
    elif kind == "study":
        home.mkdir()
        if study_db is None:
            make_study_db(home / "optuna.db")
        else:
            shutil.copy(study_db, home / "optuna.db")

    def fill(text: str) -> str:
        return (text.replace("{data}", str(DATA)).replace("{home}", str(home))
                .replace("{missing}", str(tmp / "missing")).replace("{tmp}", str(tmp)))

    argv = [fill(arg) for arg in case["argv"]]
    env = {k: v for k, v in os.environ.items() if k not in TOOL_VARIABLES}
    env.update({k: fill(v) for k, v in (case.get("env") or {}).items()})
    via = case.get("home_via", "flag")
    if via == "flag":
        argv += ["--home", str(home)]
    elif via == "env":
        env["SEARCH_HOME"] = str(home)
    before = _state(home)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([python, "-m", "search", *argv], cwd=PROJECT, env=env, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    return Outcome(argv, proc.returncode, proc.stderr, elapsed, cpu, before, _state(home))
