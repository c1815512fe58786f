"""The README's "Architecture" table names every module of search/ and every package beside it, so
a newcomer reading it finds each file; a module added without a row fails here."""

import re
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def _architecture_section() -> str:
    text = (PROJECT / "README.md").read_text()
    return text[text.index("## Architecture"):text.index("\n## ", text.index("## Architecture") + 1)]


def test_every_module_of_search_has_its_row():
    named = set(re.findall(r"`([^`]+)`", _architecture_section()))
    # A module is named whole (`search/serve.py`), by its file name in its row (`lifeline.py`), or as
    # one of its package's listed members (`search/compress/` ... `screen`).
    missing = []
    for path in sorted((PROJECT / "search").rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py") or "__pycache__" in path.parts:
            continue
        relative = path.relative_to(PROJECT).as_posix()
        package = path.parent.relative_to(PROJECT).as_posix() + "/"
        if not ({relative, path.name} & named or (package in named and path.stem in named)):
            missing.append(relative)
    assert missing == [], f"README's Architecture section does not name {missing}"


def test_the_rooms_beside_search_are_named():
    named = set(re.findall(r"`([^`]+)`", _architecture_section()))
    rooms = {f"{p.name}/" for p in PROJECT.iterdir() if p.is_dir() and not p.name.startswith(".")
             and p.name not in ("search", "__pycache__", "build") and not p.name.endswith(".egg-info") and any(p.iterdir())}
    assert rooms - named == set(), f"README's Architecture section does not name {sorted(rooms - named)}"
