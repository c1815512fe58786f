"""One base class for what the tool raises: every exception class defined in search/ and objectives/
subclasses SearchError, and search/errors.py imports nothing of the project."""

import ast
import builtins
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import objectives
import search
from search.errors import SearchError

# Modules that need the compression or serving environment (torch, transformers, llmcompressor,
# vLLM) to import: read as source instead, so that their exception classes are checked too.
ROOT = Path(__file__).resolve().parents[1]


def _modules():
    for package in (search, objectives):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith(".__main__"):  # importing it runs the CLI
                yield info.name


def _exception_classes(module) -> list[type]:
    # Exception, not BaseException: a signal (search.interrupts.Interrupted) stays a KeyboardInterrupt,
    # which `except Exception` must not catch.
    return [obj for _, obj in inspect.getmembers(module, inspect.isclass)
            if issubclass(obj, Exception) and obj.__module__ == module.__name__]


def test_every_exception_class_of_the_tool_is_a_search_error():
    found, unimportable = [], []
    for name in _modules():
        try:
            module = importlib.import_module(name)
        except ImportError:  # an environment's own dependency is missing here: checked from its source below
            unimportable.append(name)
            continue
        found += _exception_classes(module)
    assert {c.__name__ for c in found} >= {"ConfigError", "CombinationError", "Infeasible", "TrialFailed",
                                            "UnknownModelFamily", "CompressionFailed", "ServerFailed",
                                            "WindowUnreadable", "TrafficError", "TrialPruned", "SearchError"}
    assert [c.__qualname__ for c in found if not issubclass(c, SearchError)] == []
    # Modules this environment cannot import: no class there may derive from a builtin exception.
    builtin = {name for name, obj in vars(builtins).items() if inspect.isclass(obj) and issubclass(obj, Exception)}
    for name in unimportable:
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = path.with_suffix("") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                assert not bases & builtin or "SearchError" in bases, f"{name}.{node.name}"


@pytest.mark.parametrize("name, second_base", [
    ("search.config.ConfigError", ValueError), ("search.traffic.TrafficError", ValueError),
    ("search.models.UnknownModelFamily", ValueError), ("objectives.recovery.BaselineZeroError", ValueError),
    ("search.serve.ServerFailed", RuntimeError), ("search.windows.WindowUnreadable", RuntimeError),
    ("search.compress.stage.CompressionFailed", RuntimeError), ("search.track.TrackingFailed", RuntimeError),
    ("search.cli.ReferenceFailed", RuntimeError)])
def test_errors_keep_the_builtin_base_callers_catch(name, second_base):
    module, cls = name.rsplit(".", 1)
    error = getattr(importlib.import_module(module), cls)
    assert issubclass(error, SearchError) and issubclass(error, second_base)


def test_errors_module_imports_nothing_of_the_project():
    tree = ast.parse((ROOT / "search" / "errors.py").read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
