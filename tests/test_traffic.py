"""workload.traffic: the user's own chat requests as the measured job (issue 27 item 4).

A JSONL file in the forms `vllm bench serve --dataset-name custom|custom_mm` reads, or OpenAI chat
requests, is validated when the option is set (one ConfigError line naming the line), and replayed
as the measured window: one request a line, its cap the line's, its answer's length the model's own.
The replay test runs the trial's own measure_window against a small OpenAI-compatible stand-in that
streams one token a chunk and stops at the request's max_tokens, so the file implies the counts.
"""

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from search import config as cfg
from search import energy, trial, workload
from search.traffic import read

PROJECT = Path(__file__).resolve().parents[1]
EXAMPLE = PROJECT / "objectives" / "traffic" / "example.jsonl"
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4z8DwHwAFAAH/iZk9HQAAAABJRU5ErkJggg==")


def write(path: Path, *lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def refusal(values) -> str:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.build(values)
    return str(info.value)


def test_the_forms_vllm_bench_reads_and_openai_chat_requests_parse(tmp_path):
    (tmp_path / "dot.png").write_bytes(PNG)
    path = write(tmp_path / "t.jsonl",
                 {"prompt": "What is the capital of India?", "output_tokens": 10},
                 {"prompt": "How many dots?", "image_files": ["dot.png"]},
                 "",
                 {"content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": "dot.png"}]},
                 {"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "image_url", "image_url": {
                                   "url": "data:image/png;base64," + base64.b64encode(PNG).decode()}},
                                   {"type": "text", "text": "Describe"}]}], "max_tokens": 5})
    requests = read(path)
    assert [r.line for r in requests] == [1, 2, 4, 5]  # the blank line is skipped, numbers are the file's
    assert [r.max_tokens for r in requests] == [10, None, None, 5]
    assert [r.images for r in requests] == [0, 1, 1, 1]
    assert requests[0].messages == ({"role": "user", "content": "What is the capital of India?"},)
    # A file path becomes a data URL (relative to the JSONL's folder), as vLLM's bench client sends it.
    image = requests[1].messages[0]["content"][0]["image_url"]["url"]
    assert image == "data:image/png;base64," + base64.b64encode(PNG).decode()
    # The example the README points at is valid.
    assert len(read(EXAMPLE)) >= 3


def test_a_bad_traffic_file_is_one_line_naming_the_line(tmp_path):
    assert "traffic file not found" in refusal({"workload.traffic": str(tmp_path / "none.jsonl")})
    good = {"prompt": "hi"}
    message = refusal({"workload.traffic": str(write(tmp_path / "a.jsonl", good, "{not json"))})
    assert message.startswith("workload.traffic: ") and "line 2: not JSON" in message and "\n" not in message
    assert "line 3: a request needs" in refusal(
        {"workload.traffic": str(write(tmp_path / "b.jsonl", good, good, {"text": "hi"}))})
    assert "line 1: image file not found" in refusal(
        {"workload.traffic": str(write(tmp_path / "c.jsonl", {"prompt": "x", "image_files": ["no.png"]}))})
    assert "line 2: output_tokens must be a whole number" in refusal(
        {"workload.traffic": str(write(tmp_path / "d.jsonl", good, {"prompt": "x", "output_tokens": 0}))})
    assert "line 1: the last message must be the user's" in refusal(
        {"workload.traffic": str(write(tmp_path / "e.jsonl", {"messages": [{"role": "assistant", "content": "x"}]}))})
    assert "no requests" in refusal({"workload.traffic": str(write(tmp_path / "f.jsonl", ""))})


class _Stub(BaseHTTPRequestHandler):
    """Chat completions streamed one token a chunk, max_tokens of them; /metrics empty."""

    bodies: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n = body["max_tokens"]
        for i in range(n):
            chunk = {"choices": [{"delta": {"content": f"t{i} "}, "finish_reason": "length" if i == n - 1 else None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())


class _Server:
    def __init__(self, port):
        self.base_url = f"http://127.0.0.1:{port}"
        self.served_name = "stub"

    def metrics(self):
        return {}


@pytest.fixture
def stub():
    _Stub.bodies = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield _Server(httpd.server_address[1])
    httpd.shutdown()


def test_a_replayed_file_drives_the_measured_window_with_the_counts_it_implies(tmp_path, stub):
    lines = [{"prompt": "one", "output_tokens": 3}, {"prompt": "two"}, {"content": "three", "max_tokens": 5},
             {"messages": [{"role": "user", "content": "four"}], "max_completion_tokens": 2}]
    path = write(tmp_path / "traffic.jsonl", *lines)
    config = cfg.build({"workload.traffic": str(path), "workload.max_tokens": 4, "workload.verbosity": "terse",
                        "workload.n_requests": 2, "workload.concurrency": 2})
    task_prompts = [workload.Prompt("task/0", "task", "not measured", None, ("a",), "exact")]
    measured = workload.measured_prompts(config.workload, task_prompts)
    assert [p.id for p in measured] == [f"traffic/line-{i}" for i in (1, 2, 3, 4)]
    runtime = trial.Runtime(tmp_path, tmp_path, None, None, None, None, None, config, tmp_path)
    meter = energy.make_meter(None, lambda: [os.getpid()])
    results, reading, _ = trial.measure_window(runtime, stub, meter, measured, config.workload)
    meter.close()
    # One request a line, each capped by its line (the workload's max_tokens where the line gives none).
    assert len(_Stub.bodies) == len(results) == 4
    assert sorted(b["max_tokens"] for b in _Stub.bodies) == [2, 3, 4, 5]
    metrics = trial.window_metrics(results, reading, config, served=len(results))
    assert metrics["requests"] == 4 and metrics["completion_tokens"] == 3 + 4 + 5 + 2
    assert config.workload.measured_requests == 4 and "the 4 requests of" in config.workload.describe_job()
    # The user's own text is sent, behind the study's system turn; the task prompt is not measured.
    sent = {b["messages"][-1]["content"] for b in _Stub.bodies}
    assert sent == {"one", "two", "three", "four"}
    assert all(b["messages"][0] == {"role": "system", "content": workload.SYSTEM_PROMPTS["terse"]}
               for b in _Stub.bodies)
    assert all(not b["ignore_eos"] for b in _Stub.bodies)  # the answer's length is the model's own
    assert all(b["skip_special_tokens"] is False for b in _Stub.bodies)  # every token streamed, timed
