"""The user's own traffic as the measured job (`workload.traffic: FILE.jsonl`).

One request a line, in one of the forms `vllm bench serve --dataset-name custom` / `custom_mm` reads,
or an OpenAI chat request (the documented superset):

    {"prompt": "What is the capital of India?", "output_tokens": 10}                # vLLM custom
    {"prompt": "How many red blocks?", "image_files": ["blocks.png"]}               # vLLM custom_mm
    {"content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": "a.png"}]}   # custom_mm
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe"},
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}],
     "max_tokens": 64}                                                              # OpenAI chat request

Images are data URLs, http(s) URLs, or file paths (relative to the JSONL file's folder), sent as data
URLs. A line's output length is a cap, `max_tokens` / `max_completion_tokens` / `output_tokens`
(else `workload.max_tokens`): the answer's length is the model's own (no `ignore_eos` unless the
study sets it). Lines are sent once each, in file order (vLLM's bench shuffles; a replay does not).
Blank lines are skipped. The study's decoding policy, per-request seeds and system turn (verbosity,
when a conversation brings none) apply as they do to the tasks' prompts.

Pure and light (json, base64): config.py validates a file with `read` when the option is set.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.errors import SearchError


class TrafficError(SearchError, ValueError):
    """A traffic file that cannot be replayed: the message names the file and the line."""


@dataclass(frozen=True)
class Request:
    line: int
    messages: tuple  # OpenAI chat messages, images as data URLs (JSON-able, frozen as a tuple)
    max_tokens: int | None  # the line's own cap, else the workload's
    images: int


def _data_url(ref: str, folder: Path, line: int, path: Path) -> str:
    if ref.startswith(("data:", "http://", "https://")):
        return ref
    file = Path(ref.removeprefix("file://")).expanduser()
    file = file if file.is_absolute() else folder / file
    if not file.is_file():
        raise TrafficError(f"{path}: line {line}: image file not found: {file}")
    kind = mimetypes.guess_type(file.name)[0] or "image/png"
    return f"data:{kind};base64," + base64.b64encode(file.read_bytes()).decode()


def _part(part: Any, folder: Path, line: int, path: Path) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise TrafficError(f"{path}: line {line}: a content part must be an object or a string, got {part!r:.60}")
    kind = part.get("type")
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image" and isinstance(part.get("image"), str):
        return {"type": "image_url", "image_url": {"url": _data_url(part["image"], folder, line, path)}}
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if isinstance(url, str):
            return {"type": "image_url", "image_url": {"url": _data_url(url, folder, line, path)}}
    raise TrafficError(f"{path}: line {line}: unsupported content part {json.dumps(part)[:80]} "
                       "(text, image or image_url)")


def _content(content: Any, folder: Path, line: int, path: Path) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        return [_part(p, folder, line, path) for p in content]
    raise TrafficError(f"{path}: line {line}: 'content' must be a string or a non-empty list of parts")


def _cap(item: dict, line: int, path: Path) -> int | None:
    for key in ("max_completion_tokens", "max_tokens", "output_tokens"):
        if key in item and item[key] is not None:
            value = item[key]
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrafficError(f"{path}: line {line}: {key} must be a whole number >= 1, got {value!r}")
            return value
    return None


def parse_line(item: Any, folder: Path, line: int, path: Path) -> Request:
    if not isinstance(item, dict):
        raise TrafficError(f"{path}: line {line}: expected a JSON object, got {type(item).__name__}")
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not messages:
            raise TrafficError(f"{path}: line {line}: 'messages' must be a non-empty list")
        out = []
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
                raise TrafficError(f"{path}: line {line}: each message needs a 'role' and a 'content'")
            out.append({"role": message["role"], "content": _content(message["content"], folder, line, path)})
        if out[-1]["role"] != "user":
            raise TrafficError(f"{path}: line {line}: the last message must be the user's (its role is "
                               f"{out[-1]['role']!r})")
    elif "content" in item:
        out = [{"role": "user", "content": _content(item["content"], folder, line, path)}]
    elif isinstance(item.get("prompt"), str):
        images = item.get("image_files") or []
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise TrafficError(f"{path}: line {line}: 'image_files' must be a list of paths")
        parts = [{"type": "image_url", "image_url": {"url": _data_url(i, folder, line, path)}} for i in images]
        out = [{"role": "user", "content": [*parts, {"type": "text", "text": item["prompt"]}] if parts
                else item["prompt"]}]
    else:
        raise TrafficError(f"{path}: line {line}: a request needs 'messages', 'content' or a string 'prompt'")
    images = sum(1 for m in out if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image_url")
    return Request(line, tuple(out), _cap(item, line, path), images)


@functools.lru_cache(maxsize=8)
def _read(path: str, stamp: tuple[int, int]) -> tuple[Request, ...]:
    file = Path(path)
    requests = []
    with open(file, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TrafficError(f"{file}: line {number}: not JSON: {exc.msg} (column {exc.colno})") from None
            requests.append(parse_line(item, file.parent, number, file))
    if not requests:
        raise TrafficError(f"{file}: no requests (one JSON object a line)")
    return tuple(requests)


def read(path: str | Path) -> tuple[Request, ...]:
    """The file's requests, validated; TrafficError names the file and the first bad line."""
    file = Path(path)
    if not file.is_file():
        raise TrafficError(f"{file}: traffic file not found")
    stat = file.stat()
    return _read(str(file.resolve()), (stat.st_size, stat.st_mtime_ns))


def digest(path: str | Path) -> str:
    """sha256 of the file's bytes: the replayed job is part of what defines a study."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


_PROJECT = Path(__file__).resolve().parents[1]


def resolve(path: str | Path) -> Path:
    """An absolute path: as given, else in the caller's folder, else in the project's (spaces/...)."""
    file = Path(path).expanduser()
    if file.is_absolute():
        return file
    here = Path.cwd() / file
    return here.resolve() if here.exists() or not (_PROJECT / file).exists() else (_PROJECT / file).resolve()
