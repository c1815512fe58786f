"""The workload: evaluation prompts (images as data URLs) sent through the chat-completions API.

Requests stream so the time to first token is seen; each carries its own seed so a sampled answer
is reproducible; warm-up requests run before the measured window. Teacher-forced requests (the
baseline's answer appended, prompt logprobs returned) give the label-free fidelity metrics.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from search import windows
from search.config import WorkloadConfig

# Chat-template verbosity: what the system turn asks of the model. "model" leaves the template as is.
SYSTEM_PROMPTS = {
    "model": None,
    "concise": "Answer concisely, in one short sentence.",
    "terse": "Reply with the answer only: a word, a number or an option letter. No explanation.",
}


@dataclass(frozen=True)
class Prompt:
    id: str
    task: str
    text: str
    image_png: bytes | None
    answers: tuple[str, ...]
    scorer: str
    # A replayed request (workload.traffic, search/traffic.py): its own chat messages, images as data
    # URLs, and its own output cap; `text` and `image_png` are then unused.
    chat: tuple = ()
    max_tokens: int | None = None

    @property
    def images(self) -> int:
        if self.chat:
            return sum(1 for m in self.chat if isinstance(m["content"], list)
                       for part in m["content"] if part["type"] == "image_url")
        return int(self.image_png is not None)


@dataclass
class RequestResult:
    id: str
    task: str
    answer: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float | None
    error: str | None = None
    # time.monotonic() of each streamed token: the windows (search/windows.py) are cut from them.
    token_times: list[float] = field(default_factory=list)
    ended_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "token_times"}


def messages(prompt: Prompt, workload: WorkloadConfig) -> list[dict[str, Any]]:
    system = SYSTEM_PROMPTS[workload.verbosity]
    if prompt.chat:  # a replayed request: the verbosity's system turn where the conversation brings none
        chat = [dict(m) for m in prompt.chat]
        return ([{"role": "system", "content": system}] if system and chat[0]["role"] != "system" else []) + chat
    content: list[dict[str, Any]] = []
    if prompt.image_png is not None:
        url = "data:image/png;base64," + base64.b64encode(prompt.image_png).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": prompt.text})
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": system})
    out.append({"role": "user", "content": content})
    return out


def chat_template(model_dir: Path) -> str | None:
    """The chat template a checkpoint ships: chat_template.jinja, else tokenizer_config.json's."""
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    config = Path(model_dir) / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.exists() else None
    return template if isinstance(template, str) else None


def with_default_system_turn(template: str, system: str) -> str:
    """``template`` with ``system`` as the system turn of every conversation that brings none: what a
    server needs to answer a bare request as the workload's verbosity setting asked."""
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': {json.dumps(system)}}}] + messages -%}}"
            "{%- endif -%}" + template)


def load_prompts(workload: WorkloadConfig, cache_dir) -> list[Prompt]:
    """n_requests prompts, round-robin over the workload's tasks, deterministic. A generated task
    (builtin) makes at least as many distinct items as the job sends it: an evaluation
    harness repeats no prompt, and repeats would hit a prefix cache that a real job never hits."""
    from objectives.tasks import BUILTIN_DEFAULT_N, load_examples, resolve_task

    per_task = []
    needed = -(-workload.n_requests // len(workload.tasks))
    for name in workload.tasks:
        task = resolve_task(name)
        if task.scheme == "builtin" and needed > (task.n_samples or BUILTIN_DEFAULT_N):
            task = replace(task, n_samples=needed)
        examples = load_examples(task, cache_dir)
        if not examples:
            raise ValueError(f"task {name} produced no examples")
        per_task.append((task, examples))
    prompts = []
    for i in range(workload.n_requests):
        task, examples = per_task[i % len(per_task)]
        example = examples[(i // len(per_task)) % len(examples)]
        png = None
        if example.image is not None:
            buf = io.BytesIO()
            example.image.convert("RGB").save(buf, format="PNG")
            png = buf.getvalue()
        prompts.append(Prompt(f"{task.name}/{example.id}", task.name, example.prompt, png,
                              tuple(example.answers), task.scorer))
    return prompts


def traffic_prompts(workload: WorkloadConfig) -> list[Prompt]:
    """The requests of workload.traffic, one Prompt a line, in file order (task "traffic": no labels)."""
    from search.traffic import read
    return [Prompt(f"traffic/line-{r.line}", "traffic", "", None, (), "", chat=r.messages, max_tokens=r.max_tokens)
            for r in read(workload.traffic)]


def measured_prompts(workload: WorkloadConfig, task_prompts: list[Prompt]) -> list[Prompt]:
    """What one measured window sends: the traffic file's requests when the study replays one, else
    the tasks' prompts."""
    return traffic_prompts(workload) if workload.traffic else task_prompts


def request_body(model: str, prompt: Prompt, workload: WorkloadConfig, index: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": messages(prompt, workload),
        "max_tokens": prompt.max_tokens or workload.max_tokens,
        "temperature": 0.0 if workload.decoding == "greedy" else workload.temperature,
        "top_p": workload.top_p,
        "top_k": workload.top_k,
        "seed": workload.seed * 100_003 + index,
        "ignore_eos": workload.ignore_eos,
        "chat_template_kwargs": {"enable_thinking": workload.thinking},
        "stream": True,
        "stream_options": {"include_usage": True},
        # Fidelity teacher-forces the baseline's answer as text: keep every generated token in it. A
        # replayed request is never teacher-forced: its answer ends where the model ends it, and every
        # token it generates is streamed (a special token too), so the windows see each token's time.
        **({"skip_special_tokens": False} if prompt.chat else
           {"skip_special_tokens": False, "ignore_eos": True} if workload.quality == "fidelity" else {}),
    }


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], prompt: Prompt,
               timeout_s: float) -> RequestResult:
    started = time.perf_counter()
    ttft = None
    pieces: list[str] = []
    token_times: list[float] = []
    usage: dict[str, int] = {}
    finish = None
    try:
        async with client.stream("POST", url, json=body, timeout=timeout_s) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {response.status_code}: {text[:300]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # vLLM reports an engine failure inside a 200 stream
                    raise RuntimeError(f"stream error: {json.dumps(chunk['error'])[:300]}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    finish = choice.get("finish_reason") or finish
                    delta = choice.get("delta", {}).get("content")
                    if delta:
                        if ttft is None:
                            ttft = time.perf_counter() - started
                        pieces.append(delta)
                        token_times.append(time.monotonic())
            if finish is None:
                raise RuntimeError("the response stream ended before the answer finished")
    except (httpx.HTTPError, RuntimeError, json.JSONDecodeError) as exc:
        return RequestResult(prompt.id, prompt.task, "", 0, 0, time.perf_counter() - started, None,
                             f"{type(exc).__name__}: {exc}"[:300], ended_at=time.monotonic())
    return RequestResult(prompt.id, prompt.task, "".join(pieces), usage.get("prompt_tokens", 0),
                         usage.get("completion_tokens", 0), time.perf_counter() - started, ttft,
                         token_times=token_times, ended_at=time.monotonic())


def arrival_offsets(workload: WorkloadConfig, n: int) -> list[float]:
    """Seconds after the start at which each request may be sent: 0 for all of them except under a
    Poisson rate, whose gaps are drawn from the workload's seed (the same schedule every trial)."""
    if workload.arrival != "rate":
        return [0.0] * n
    rng = random.Random(workload.seed)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(workload.rate_rps)
    return offsets


async def _run(base_url: str, model: str, prompts: list[Prompt], workload: WorkloadConfig,
               first_index: int, timeout_s: float) -> list[RequestResult]:
    # all_at_once: every request in flight from the start (the benchmark replay the seeds' cards
    # ran); concurrency: a closed loop of N; rate: open-loop Poisson arrivals.
    in_flight = min(workload.max_in_flight, max(1, len(prompts)))
    limit = asyncio.Semaphore(in_flight)
    url = f"{base_url}/v1/chat/completions"
    offsets = arrival_offsets(workload, len(prompts))
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(limits=limits) as client:
        started = time.monotonic()

        async def bounded(i: int, prompt: Prompt) -> RequestResult:
            await asyncio.sleep(max(0.0, started + offsets[i] - time.monotonic()))
            async with limit:
                return await _one(client, url, request_body(model, prompt, workload, first_index + i),
                                  prompt, timeout_s)
        return await asyncio.gather(*(bounded(i, p) for i, p in enumerate(prompts)))


def run(base_url: str, model: str, prompts: list[Prompt], workload: WorkloadConfig,
        first_index: int = 0, timeout_s: float = 600) -> list[RequestResult]:
    """Send prompts as the workload's arrival mode says; results in prompt order."""
    return asyncio.run(_run(base_url, model, prompts, workload, first_index, timeout_s))


def warm_up(base_url: str, model: str, prompts: list[Prompt], workload: WorkloadConfig) -> list[RequestResult]:
    """Requests outside the measured window, so first-call costs do not count as the trial's energy."""
    # A marker in front of each text makes every warm-up prompt's first KV block differ from the
    # measured prompt's, so a prefix cache (when a study turns one on) cannot carry warm-up into the window.
    warm = [replace(p, id=f"warmup/{p.id}", text=f"(warm-up {i}) {p.text}", chat=_marked(p.chat, f"(warm-up {i}) "))
            for i, p in enumerate(prompts[: workload.warmup_requests])]
    return run(base_url, model, warm, workload, first_index=-10_000) if warm else []


def _marked(chat: tuple, marker: str) -> tuple:
    """A replayed conversation with `marker` before its first text (warm-up requests)."""
    if not chat:
        return chat
    first = dict(chat[0])
    content = first["content"]
    if isinstance(content, str):
        first["content"] = marker + content
    else:
        first["content"] = [{"type": "text", "text": marker}, *content]
    return (first, *chat[1:])


def teacher_forced_logprobs(base_url: str, model: str, prompt: Prompt, answer: str,
                            workload: WorkloadConfig, k: int = 5, timeout_s: float = 600) -> list[dict | None]:
    """Top-k logprobs at every position of the prompt with `answer` forced as the model's turn.

    All positions count, not only the answer's: a random-weight model's own answers are repetitive,
    so the prompt's varied text and image positions are where its predictions are tested."""
    body = {
        "model": model,
        "messages": messages(prompt, workload) + [{"role": "assistant", "content": answer}],
        "add_generation_prompt": False,
        "continue_final_message": True,
        "chat_template_kwargs": {"enable_thinking": workload.thinking},
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": k,
    }
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout_s)
    response.raise_for_status()
    return response.json()["prompt_logprobs"]


def summarize(results: list[RequestResult], window_s: float) -> dict[str, float]:
    """Counts, latencies (TTFT and inter-token p50/p90/p99) and throughput of one run."""
    ok = [r for r in results if r.error is None]
    latencies = sorted(r.latency_s for r in ok)
    ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    completion = sum(r.completion_tokens for r in ok)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {
        "requests": len(results), "request_errors": len(results) - len(ok),
        "prompt_tokens": sum(r.prompt_tokens for r in ok), "completion_tokens": completion,
        "tokens_per_answer": completion / len(ok) if ok else 0.0,
        "latency_p50_s": pct(latencies, 0.5), "latency_p95_s": pct(latencies, 0.95),
        "ttft_p50_s": pct(ttfts, 0.5), "throughput_tok_s": completion / window_s if window_s > 0 else 0.0,
        **{f"{k}_ms": v * 1000 for k, v in windows.percentiles(ttfts, "ttft").items()},
        **{f"{k}_ms": v * 1000 for k, v in windows.percentiles(windows.inter_token_gaps(
            [r.token_times for r in ok]), "itl").items()},
    }

