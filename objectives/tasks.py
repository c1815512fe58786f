"""Evaluation tasks as data: one YAML file per task in ``objectives/tasks/``.

A task names a source of (image, question, answers[, choices]) rows, how its columns map onto
those roles, a prompt template, a scorer, and a deterministic subsample. Sources:

* ``builtin:<task>``: the generated suite in ``builtin_suite`` (generated into the cache if missing)
* ``text:<task>``: the text-only suite in ``text_suite`` (no images; for text models)
* ``hub:<name>``: ``datasets.load_dataset(name, config, split=split)``
* ``disk:<path>``: ``datasets.load_from_disk(path)`` (``split`` picks from a DatasetDict)
* ``imagefolder:<path>``: ``datasets.load_dataset("imagefolder", data_dir=path)``
* ``jsonl:<path>``: one JSON object a line; image paths are relative to the file

Relative paths in a YAML file's source are relative to that YAML file. A workload names a task by
its registry name or by the path of a task YAML file of the user's own (``resolve_task``).
"""

from __future__ import annotations

import ast
import io
import json
import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import yaml
from PIL import Image
from pydantic import ConfigDict, Field, StrictInt, StrictStr
from pydantic.dataclasses import dataclass as pydantic_dataclass

from objectives import builtin_suite, text_suite
from objectives.scorers import get_scorer

TASK_DIR = Path(__file__).parent / "tasks"
# Text-only tasks (no image column) keep a registry of their own, for text models.
TEXT_TASK_DIR = TASK_DIR / "text"
SCHEMES = ("builtin", "text", "hub", "disk", "imagefolder", "jsonl")
COLUMN_ROLES = ("id", "image", "question", "answers", "choices")
DEFAULT_COLUMNS: dict[str, str | None] = {
    "id": None,
    "image": "image",
    "question": "question",
    "answers": "answers",
    "choices": None,
}
TEMPLATE_FIELDS = ("question", "choices")
OPTION_LETTERS = string.ascii_uppercase
# Builtin sources are generated at this size (the suite's default).
BUILTIN_IMAGE_SIZE = (448, 448)
BUILTIN_DEFAULT_N = 32


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class Task:
    """A task file's fields, typed and validated when a Task is made (a key the file should not
    have, a value of the wrong type, a source or scorer that does not exist): `load_task_file`
    reports any of them as one line naming the file."""

    name: StrictStr
    source: StrictStr  # <scheme>:<target>, scheme in SCHEMES
    scorer: StrictStr  # a name objectives/scorers.py knows
    prompt_template: StrictStr = "{question}"  # may use {question} and {choices}
    split: StrictStr | None = None
    config: StrictStr | None = None  # a hub dataset's configuration
    columns: dict[StrictStr, StrictStr | None] = Field(default_factory=dict)  # role (COLUMN_ROLES) -> column
    n_samples: StrictInt | None = Field(None, ge=1)  # a deterministic subsample of this many rows; None: all
    seed: StrictInt = 0

    def __post_init__(self) -> None:
        scheme, _, target = self.source.partition(":")
        if scheme not in SCHEMES or not target:
            raise ValueError(
                f"task {self.name!r}: source {self.source!r} is not '<scheme>:<target>'"
                f" with scheme in {SCHEMES}"
            )
        if scheme == "builtin" and target not in builtin_suite.TASKS:
            raise ValueError(
                f"task {self.name!r}: unknown builtin task {target!r}; known: {builtin_suite.TASKS}"
            )
        if scheme == "text" and target not in text_suite.TASKS:
            raise ValueError(f"task {self.name!r}: unknown text task {target!r}; known: {text_suite.TASKS}")
        if scheme == "hub" and self.split is None:
            raise ValueError(f"task {self.name!r}: a hub source needs a split")
        try:
            get_scorer(self.scorer)
        except ValueError as e:
            raise ValueError(f"task {self.name!r}: {e}") from None
        unknown = sorted(set(self.columns) - set(COLUMN_ROLES))
        if unknown:
            raise ValueError(
                f"task {self.name!r}: unknown column role(s) {unknown}; known: {list(COLUMN_ROLES)}"
            )
        self.columns = {**DEFAULT_COLUMNS, **self.columns}
        used = {name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name is not None}
        if used - set(TEMPLATE_FIELDS):
            raise ValueError(
                f"task {self.name!r}: prompt_template uses {sorted(used - set(TEMPLATE_FIELDS))};"
                f" allowed: {TEMPLATE_FIELDS}"
            )
        # Choices the prompt never shows would make a multiple-choice task unanswerable.
        if self.columns["choices"] is not None and "choices" not in used:
            raise ValueError(
                f"task {self.name!r}: columns.choices is set but prompt_template has no {{choices}}"
            )

    @property
    def scheme(self) -> str:
        return self.source.partition(":")[0]

    @property
    def target(self) -> str:
        return self.source.partition(":")[2]


@dataclass
class Example:
    id: str
    image: Image.Image | None
    prompt: str
    answers: list[str]


_TASK_KEYS = tuple(f.name for f in fields(Task))
_LOCAL_SCHEMES = ("disk", "imagefolder", "jsonl")


def load_task_file(path: str | os.PathLike) -> Task:
    """One task from a YAML file; ``name`` defaults to the file's stem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:  # unreadable, not text
        raise ValueError(f"{path}: cannot be read as a YAML text file: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a task file must be a YAML mapping")
    data.setdefault("name", path.stem)
    scheme, _, target = str(data.get("source", "")).partition(":")
    if scheme in _LOCAL_SCHEMES and target and not Path(target).is_absolute():
        data["source"] = f"{scheme}:{(path.parent / target).resolve()}"
    try:
        task = _TASK.validate_python(data)
    except pydantic.ValidationError as e:
        raise ValueError(f"{path}: {_one_line(e, data)}") from None
    try:
        _check_local_source(task)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return task


_TASK = pydantic.TypeAdapter(Task)
# What a field takes, for a value of the wrong type.
_TAKES = {"split": "a string or null", "config": "a string or null", "n_samples": "an integer >= 1 or null",
          "seed": "an integer", "columns": "a mapping of role -> column name"}


def _one_line(exc: pydantic.ValidationError, data: dict) -> str:
    """pydantic's report on a task file -> one line: a key the file should not have, then the keys
    it lacks, then the first value that is wrong (a rule of Task's own, in its own words)."""
    errors = exc.errors()
    extra = [e["loc"][0] for e in errors if e["type"] in ("unexpected_keyword_argument", "extra_forbidden",
                                                           "invalid_key")]
    if extra:
        return f"unknown key {extra[0]!r}; allowed: {list(_TASK_KEYS)}"
    missing = sorted(str(e["loc"][0]) for e in errors if e["type"] in ("missing", "missing_argument"))
    if missing:
        return f"missing key(s) {missing}"
    error = errors[0]
    raised = error.get("ctx", {}).get("error")
    if isinstance(raised, ValueError):
        return str(raised)
    key = str(error["loc"][0]) if error["loc"] else "?"
    value = data.get(key)
    if key == "columns" and isinstance(value, dict) and len(error["loc"]) > 1:
        return f"task {data.get('name')!r}: columns.{error['loc'][1]} must be a column name or null, got {error['input']!r}"
    return f"task {data.get('name')!r}: {key} must be {_TAKES.get(key, 'a string')}, got {value!r}"


def _check_local_source(task: Task) -> None:
    """A local source exists, and a jsonl file's rows are JSON objects holding the task's columns
    (and its images): read when the task is named, not when the baseline reaches it."""
    if task.scheme not in _LOCAL_SCHEMES:
        return
    source = Path(task.target)
    if not source.exists():
        raise ValueError(f"task {task.name!r}: source file not found: {source}")
    if task.scheme != "jsonl":
        return
    columns = {role: column for role, column in task.columns.items() if column is not None}
    with source.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                raise ValueError(f"task {task.name!r}: {source} line {number} is not a JSON object")
            for role, column in columns.items():
                if column not in row:
                    raise ValueError(f"task {task.name!r}: column {column!r} ({role}) is not in row {number} of "
                                     f"{source}; its columns: {sorted(row)}")
            image = row.get(columns["image"]) if "image" in columns else None
            if isinstance(image, str) and not (source.parent / image).is_file():
                raise ValueError(f"task {task.name!r}: image {image!r} of row {number} of {source} not found")


def load_registry(directory: str | os.PathLike = TASK_DIR) -> dict[str, Task]:
    """All tasks defined by ``*.yaml`` files in ``directory``, by name."""
    registry: dict[str, Task] = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        task = load_task_file(path)
        if task.name in registry:
            raise ValueError(f"{path}: task name {task.name!r} is defined twice")
        registry[task.name] = task
    return registry


def get_task(name: str, directory: str | os.PathLike = TASK_DIR) -> Task:
    registry = load_registry(directory)
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {sorted(registry)}") from None


def resolve_task(name_or_path: str) -> Task:
    """A task of the image or the text registry by name, or the task in a YAML file the user names
    by path (absolute, or relative to the working directory; its local sources are relative to that
    file), as lm-eval's --include_path adds tasks without editing the package."""
    if name_or_path.endswith((".yaml", ".yml")):
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"task file not found: {path}")
        return load_task_file(path)
    text = load_registry(TEXT_TASK_DIR)
    return text[name_or_path] if name_or_path in text else get_task(name_or_path)


def subsample_indices(n_total: int, n_samples: int | None, seed: int) -> list[int]:
    """Sorted row indices to use. Prefixes of one permutation, so a smaller n_samples with the same
    seed picks a subset of a larger one."""
    if n_samples is None or n_samples >= n_total:
        return list(range(n_total))
    chosen = np.random.default_rng(seed).permutation(n_total)[:n_samples]
    return sorted(int(i) for i in chosen)


def _open_image(value: Any) -> Image.Image | None:
    if value is None:
        return None
    # convert() also copies the pixels, so no image keeps its file open.
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, Mapping):  # datasets' undecoded Image: {"bytes": ..., "path": ...}
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
    with Image.open(value) as opened:
        return opened.convert("RGB")


def _as_answers(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def _as_choices(value: Any, task: Task) -> list[str]:
    # MMMU stores options as the repr of a Python list.
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"task {task.name!r}: choices {value[:80]!r} is not a list") from None
    if not isinstance(value, (list, tuple)) or len(value) > len(OPTION_LETTERS):
        raise ValueError(f"task {task.name!r}: choices must be a list of at most {len(OPTION_LETTERS)} items")
    return [str(v) for v in value]


def format_choices(choices: Sequence[str]) -> str:
    return "\n".join(f"{OPTION_LETTERS[i]}. {choice}" for i, choice in enumerate(choices))


def _example(task: Task, row: Mapping[str, Any], index: int) -> Example:
    cols = task.columns

    def get(role: str) -> Any:
        column = cols[role]
        if column is None:
            return None
        if column not in row:
            raise ValueError(
                f"task {task.name!r}: column {column!r} (for {role}) not in row; columns: {sorted(row)}"
            )
        return row[column]

    choices = get("choices")
    prompt = task.prompt_template.format(
        question=str(get("question") or ""),
        choices=format_choices(_as_choices(choices, task)) if choices is not None else "",
    )
    row_id = get("id")
    return Example(
        id=str(row_id) if row_id is not None else f"{task.name}-{index}",
        image=_open_image(get("image")),
        prompt=prompt,
        answers=_as_answers(get("answers")),
    )


def _builtin_rows(task: Task, cache_dir: Path) -> list[dict[str, Any]]:
    n = task.n_samples or BUILTIN_DEFAULT_N
    width, height = BUILTIN_IMAGE_SIZE
    suite_dir = cache_dir / "builtin" / f"seed{task.seed}-n{n}-{width}x{height}"
    if not (suite_dir / builtin_suite.MANIFEST).exists():
        builtin_suite.generate(suite_dir, seed=task.seed, n_per_task=n, image_size=BUILTIN_IMAGE_SIZE)
    rows = [row for row in builtin_suite.load(suite_dir) if row["task"] == task.target]
    return [{**row, "image": suite_dir / row["image"]} for row in rows]


def _jsonl_rows(path: Path, task: Task) -> list[dict[str, Any]]:
    rows = []
    image_column = task.columns["image"]
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if image_column is not None and row.get(image_column) is not None:
                    row[image_column] = path.parent / row[image_column]
                rows.append(row)
    return rows


def _dataset(task: Task, cache_dir: Path) -> Any:
    import datasets  # heavy; only the hub/disk/imagefolder sources need it

    if task.scheme == "hub":
        return datasets.load_dataset(task.target, task.config, split=task.split)
    if task.scheme == "imagefolder":
        # The arrow files built from a local folder belong with the other derived data.
        return datasets.load_dataset(
            "imagefolder",
            data_dir=task.target,
            split=task.split or "train",
            cache_dir=str(cache_dir / "datasets"),
        )
    loaded = datasets.load_from_disk(task.target)
    if isinstance(loaded, datasets.DatasetDict):
        if task.split is None:
            raise ValueError(f"task {task.name!r}: {task.target} holds splits {list(loaded)}; set split")
        return loaded[task.split]
    return loaded


def load_examples(task: Task, cache_dir: str | os.PathLike) -> list[Example]:
    """The task's examples: subsampled by (n_samples, seed), template applied, images as RGB.

    ``cache_dir`` holds the generated builtin suite and imagefolder's arrow files; hub datasets
    use the datasets library's own cache, where downloads are shared with other tools.
    """
    if task.scheme == "builtin":
        rows: Any = _builtin_rows(task, Path(cache_dir))
    elif task.scheme == "text":
        rows = text_suite.rows(task.target, task.seed)
    elif task.scheme == "jsonl":
        rows = _jsonl_rows(Path(task.target), task)
    else:
        rows = _dataset(task, Path(cache_dir))
    indices = subsample_indices(len(rows), task.n_samples, task.seed)
    if isinstance(rows, list):
        selected = [rows[i] for i in indices]
    else:
        # Select before iterating so that only the chosen rows' images are decoded.
        selected = rows.select(indices)
    return [_example(task, row, index) for row, index in zip(selected, indices, strict=True)]
