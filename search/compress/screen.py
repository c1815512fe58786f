"""The pre-serve screen: a compressed model scored against the reference by teacher forcing while it
is still in the compression worker's memory, before any checkpoint is saved or server started
(issue 26, item 1). A trial that cannot reach the gate stops there, PRUNED with
`pruned_before_serving`.

- with labels (``workload.quality: labels``): each item's labelled answer is forced under the
  trial's own prompt (system turn, thinking) and scored as lm-evaluation-harness scores a
  loglikelihood task (objectives/loglikelihood.py): correct when every label token is the argmax,
  and its log-likelihood. The label sits where the reference's answer puts it. The reference is
  scored the same way, once per study, on the uncompressed weights the worker loads before it
  compresses (under the reference's settings); recovery is the ratio, per task, as the gate's.
- without labels: top-1 agreement and top-k KL against the reference's teacher-forced positions
  (the baseline's, made by vLLM), exactly as the served fidelity score (objectives/fidelity.py).

The verdict lowers the gate by a margin calibrated against the served gate on real weights
(bench/results/pre-serve-screen-2026-12-06.json; its script is retired, bench/README.md), so that it prunes
no configuration the served gate passes. The served screen in the trial is kept only where this one
could not judge (no compression ran, a cached checkpoint, a skipped screen) or judged close to the
gate.

The top half runs in the study process (no torch): whether a trial can be screened, its spec, the
memo of earlier verdicts. The bottom half runs in the compression worker (search/compress/worker.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from objectives import fidelity, loglikelihood, scoring
from objectives.recovery import Gate
from objectives.scoring import TrialPruned

# How far under the gate the screen's mean recovery may fall before it prunes. Calibrated on
# SmolLM2-135M against the served gate of a 50-trial study (bench/pre_serve_screen.py,
# bench/results/pre-serve-screen-2026-12-06.json): the smallest margin that prunes no configuration
# the served gate passed (0: the lowest such screen score was 0.845), rounded up to a multiple of
# 0.05, plus one step of 0.05 for what the screen cannot see (an FP8 KV cache, the served numerics)
# and for GPTQ's spread between two compressions.
MARGIN = 0.05
# A pass this far above the lowered threshold skips the served screen: in that study the served
# screen pruned nothing, and every configuration the screen put above 0.85 recovered >= 0.76 served.
CONFIDENT = 0.1
VERSION = 1  # of the scoring: a change invalidates the reference's scores and the memo of verdicts


class PrunedBeforeServing(TrialPruned):
    """The screen showed the compressed model cannot reach the gate: no checkpoint, no server."""

    def __init__(self, reason: str, result: Mapping[str, Any]):
        super().__init__(reason)
        self.result = dict(result)


# --------------------------------------------------------------------------------------------
# Study side: can this trial be screened, and its spec


_said: set[str] = set()


def say_once(reason: str) -> None:
    """A skipped screen is told once per run, not per trial."""
    if reason not in _said:
        _said.add(reason)
        print(f"pre-serve screen off: {reason}", file=sys.stderr)


def skip_reason(family, gate: Gate, prompts: Sequence, needs_checkpoint: bool) -> str | None:
    """Why the screen cannot or need not run for a trial, or None when it runs."""
    if not needs_checkpoint:
        return None  # nothing compressed: the served screen judges request settings alone
    if not gate.can_prune:
        return "under a gate of 0 no score prunes"
    unsupported = getattr(family, "screen_unsupported", "this model family has no in-process scoring path")
    if unsupported:
        return f"{family.name}: {unsupported}"
    if any(getattr(p, "image_png", None) is not None for p in prompts):
        return "prompts with images are not scored in the compression worker"
    return None


def system_turn(settings) -> str | None:
    from search.workload import SYSTEM_PROMPTS
    return SYSTEM_PROMPTS[settings.verbosity]


def make_spec(quality: str, prompts: Sequence, baseline_items: Sequence[Mapping], trial_settings,
              reference_settings, gate: Gate, study_dir: Path, baseline_key: str,
              margin: float = MARGIN) -> dict[str, Any]:
    """What the worker needs to screen one trial: the items (prompt text, labels, the reference's
    answer and, without labels, its teacher-forced positions), both prompt settings, the gate and
    margin, and where the reference's own scores are kept (made by the first screened trial)."""
    base_by_id = {item["id"]: item for item in baseline_items}
    items, seen = [], set()
    if quality == "fidelity":
        chosen = [(item, None) for item in baseline_items if item["positions"] is not None]
    else:
        chosen = [(base_by_id[p.id], p) for p in prompts if p.id in base_by_id]
    by_prompt = {p.id: p for p in prompts}
    for item, prompt in chosen:
        if item["id"] in seen:
            continue
        seen.add(item["id"])
        prompt = prompt or by_prompt.get(item["id"])
        if prompt is None:
            continue
        entry = {"id": item["id"], "task": item["task"], "text": prompt.text, "scorer": prompt.scorer,
                 "answers": list(prompt.answers), "ref_answer": item["answer"],
                 "completion_tokens": item.get("completion_tokens", 0)}
        if quality == "fidelity":
            entry["positions"] = item["positions"]
        items.append(entry)

    def settings(s) -> dict[str, Any]:
        return {"system": system_turn(s), "thinking": s.thinking, "max_tokens": s.max_tokens}

    spec = {"version": VERSION, "quality": quality, "items": items, "trial": settings(trial_settings),
            "reference": settings(reference_settings), "margin": margin, "seed": trial_settings.seed,
            "gate": {"threshold": gate.threshold, "per_task_min": gate.per_task_min}}
    if quality == "labels":
        material = {"baseline": baseline_key, "version": VERSION, "reference": spec["reference"],
                    "items": [[i["id"], i["ref_answer"], i["answers"], i["scorer"]] for i in items]}
        digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
        spec["reference_path"] = str(study_dir / f"screen-reference-{digest}.json")
    return spec


def for_trial(runtime, config, baseline) -> dict[str, Any] | None:
    """The screen's spec for one trial of a study (search/trial.py's Runtime and Baseline), or None
    where it does not run (said once per run when the reason is worth a line)."""
    if not config.compress.needs_checkpoint:
        return None  # nothing is compressed: the served screen judges request settings alone
    prompts = runtime.prompts(config.workload)
    reason = skip_reason(runtime.family, runtime.gate, prompts, True)
    if reason is not None:
        say_once(reason)
        return None
    return make_spec(config.workload.quality, prompts, baseline.items, config.workload,
                     runtime.reference.workload, runtime.gate, runtime.workdir, str(baseline.key),
                     MARGIN)


def spec_digest(spec: Mapping[str, Any]) -> str:
    """What decides a verdict besides the compressed weights: the memo's key with the cache key."""
    material = {k: v for k, v in spec.items() if k != "reference_path"}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


def memo_path(cache_root: Path, key: str, spec: Mapping[str, Any]) -> Path:
    return cache_root / "screens" / f"{key}-{spec_digest(spec)}.json"


def remembered_prune(cache_root: Path, key: str, spec: Mapping[str, Any]) -> PrunedBeforeServing | None:
    """The same weights screened under the same settings were pruned before: prune again without
    compressing (a pruned trial leaves no checkpoint to find in the cache)."""
    path = memo_path(cache_root, key, spec)
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return PrunedBeforeServing(f"{result['reason']} (as when these weights were screened before)",
                               {**result, "remembered": True})


def remember_prune(cache_root: Path, key: str, spec: Mapping[str, Any], result: Mapping[str, Any]) -> None:
    path = memo_path(cache_root, key, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)


def metrics(result: Mapping[str, Any] | None) -> dict[str, float]:
    """The screen's numbers as trial metrics (`pre_serve_*`)."""
    if not result:
        return {}
    out = {"pre_serve_recovery": result["mean"], "pre_serve_screen_s": result["seconds"]}
    for key in ("loglik_drop", "top1_agreement", "topk_kl"):
        if result.get(key) is not None:
            out[f"pre_serve_{key}"] = result[key]
    return out


def confident(result: Mapping[str, Any] | None) -> bool:
    """A pass clearly above the lowered gate: the served screen would find nothing more."""
    return bool(result) and not result["prune"] and \
        result["mean"] >= result["threshold"] - result["margin"] + CONFIDENT


# --------------------------------------------------------------------------------------------
# Worker side (torch): teacher forcing in the compression worker


def _chat_text(tokenizer, text: str, settings: Mapping[str, Any]) -> str:
    """The prompt as vLLM renders it for a chat request: the checkpoint's template, the trial's
    system turn, text content parts joined (a string-content template), then the assistant's turn."""
    messages = ([{"role": "system", "content": settings["system"]}] if settings["system"] else []) + \
        [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=settings["thinking"])


def _sequences(tokenizer, items: Sequence[Mapping], settings: Mapping[str, Any], quality: str) -> list[dict]:
    """Token sequences to force, one per item (and one more where its label is forced bare):
    prompt + the reference's answer (with labels, up to its label's last token: the rows up to it
    do not depend on what follows), with where the answer starts."""
    out = []
    for index, item in enumerate(items):
        context = tokenizer(_chat_text(tokenizer, item["text"], settings), add_special_tokens=False)["input_ids"]
        answer = item["ref_answer"] or ""
        encoded = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
        if quality != "labels":
            out.append({"item": index, "ids": context + ids, "context": len(context)})
            continue
        text, start, end, inside = loglikelihood.carrier(answer, item["answers"], item["scorer"])
        label = loglikelihood.scored_tokens(offsets, start, end) if inside else []
        if label:  # the label where the reference's answer puts it
            out.append({"item": index, "ids": context + ids[:label[-1] + 1], "context": len(context), "label": label})
        else:  # the reference's answer has no label: the bare label, as lm-evaluation-harness forces it
            bare = tokenizer(loglikelihood.carrier(None, item["answers"], item["scorer"])[0],
                             add_special_tokens=False)["input_ids"]
            out.append({"item": index, "ids": context + bare, "context": len(context),
                        "label": list(range(len(bare))), "bare": True})
    return out


def _common_prefix(sequences: Sequence[Mapping]) -> int:
    """Tokens every sequence starts with (the chat template's system turn): computed once."""
    first = sequences[0]["ids"]
    n = min(min(len(s["ids"]), s["context"]) for s in sequences) - 1  # every sequence keeps a token of its own
    for s in sequences[1:]:
        ids = s["ids"]
        k = 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
    return max(0, n)


def _forward(model, sequences: Sequence[Mapping], wants_all: bool, token_budget: int = 2048):
    """For each sequence, yields (sequence, logprob rows): the rows predicting its answer tokens
    (index j predicts answer token j), every row when `wants_all` (index j predicts token j + 1).
    The prefix all sequences share runs once and its KV cache is reused; batches of similar length."""
    import copy

    import torch

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = next(model.parameters()).device
    shared = _common_prefix(sequences)
    prefix_hidden, prefix_cache = None, None
    with torch.inference_mode():
        if shared:
            out = decoder(input_ids=torch.tensor([sequences[0]["ids"][:shared]], device=device), use_cache=True)
            prefix_hidden, prefix_cache = out.last_hidden_state[0], out.past_key_values
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]["ids"]))

    def run(batch):
        longest = max(len(sequences[i]["ids"]) for i in batch) - shared
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros((len(batch), shared + longest), dtype=torch.long)
        mask[:, :shared] = 1
        for row, i in enumerate(batch):
            own = sequences[i]["ids"][shared:]
            ids[row, :len(own)] = torch.tensor(own)
            mask[row, shared:shared + len(own)] = 1
        kwargs = {}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(batch))
            kwargs = {"past_key_values": cache, "use_cache": True}
        with torch.inference_mode():
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).last_hidden_state
            for row, i in enumerate(batch):
                seq = sequences[i]
                first = 0 if wants_all else seq["context"] - 1  # the row predicting the first answer token
                last = len(seq["ids"]) - 1
                rows = hidden[row, max(0, first - shared):last - shared]
                if first < shared:
                    rows = torch.cat([prefix_hidden[first:], rows])
                yield seq, torch.log_softmax(head(rows).float(), dim=-1).cpu()

    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * (len(sequences[i]["ids"]) - shared) > token_budget:
            yield from run(batch)
            batch = []
        batch.append(i)
    if batch:
        yield from run(batch)


def _positions(rows, ids: Sequence[int], k: int = 5) -> list[dict[str, float] | None]:
    """vLLM's prompt_logprobs from the rows predicting tokens 1..n-1: None for the first position,
    then the top-k and the actual token's logprob at each."""
    import torch

    top = torch.topk(rows, k, dim=-1)
    out: list[dict[str, float] | None] = [None]
    for j in range(rows.shape[0]):
        entry = {str(int(t)): float(v) for t, v in zip(top.indices[j], top.values[j])}
        entry[str(int(ids[j + 1]))] = float(rows[j, ids[j + 1]])
        out.append(entry)
    return out


def score(model, tokenizer, spec: Mapping[str, Any], side: str) -> list[dict[str, Any]]:
    """Per item: with labels, `greedy` (0/1) and `loglik` of its label under `side`'s settings
    ("trial" or "reference"); without, `top1` and `kl` against the reference's positions."""
    settings, quality, items = spec[side], spec["quality"], spec["items"]
    rows: list[dict[str, Any]] = [{"task": item["task"]} for item in items]
    sequences = _sequences(tokenizer, items, settings, quality)
    for seq, logprobs in _forward(model, sequences, wants_all=quality == "fidelity"):
        item, row = items[seq["item"]], rows[seq["item"]]
        if quality == "fidelity":
            trial = _positions(logprobs, seq["ids"])
            base, mine = fidelity.common_suffix(item["positions"], trial)
            cut = max(0, item["completion_tokens"] - settings["max_tokens"])
            row.update(top1=fidelity.top1_agreement(base, mine, missed_tail=cut), kl=fidelity.topk_kl(base, mine))
            continue
        label = seq.get("label")
        if not label:
            continue  # the label's row comes from the bare sequence
        answer_ids = seq["ids"][seq["context"]:]
        got = loglikelihood.score_continuation(logprobs[label].numpy(), [answer_ids[j] for j in label])
        greedy = got.greedy and not loglikelihood.past_budget(label[-1], settings["max_tokens"])
        row.update(greedy=float(greedy), loglik=got.loglik, label_tokens=got.n_tokens, bare=bool(seq.get("bare")))
    return rows


def reference_scores(model, tokenizer, spec: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The reference's scores (labels), from the file the first screened trial wrote; made now, on
    the uncompressed weights, when there is none. Call before compressing."""
    if spec["quality"] != "labels":
        return None
    path = Path(spec["reference_path"])
    if path.exists():
        return json.loads(path.read_text())
    rows = score(model, tokenizer, spec, "reference")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rows))
    tmp.replace(path)
    return rows


def judge(spec: Mapping[str, Any], trial: Sequence[Mapping], reference: Sequence[Mapping] | None) -> dict[str, Any]:
    """The screen's recovery per task, its verdict and its side numbers (pure: no model)."""
    gate = Gate(spec["gate"]["threshold"], "point", spec["gate"]["per_task_min"])
    paired: scoring.PairedScores = {}
    result: dict[str, Any] = {}
    if spec["quality"] == "fidelity":
        rows = [(r["task"], r["top1"], r["kl"]) for r in trial if "top1" in r]
        paired = scoring.paired_scores("fidelity", [], [], rows, {})
        result["top1_agreement"] = sum(r[1] for r in rows) / len(rows) if rows else None
        result["topk_kl"] = sum(r[2] for r in rows) / len(rows) if rows else None
    else:
        pairs = [(t, r) for t, r in zip(trial, reference, strict=True) if "greedy" in t and "greedy" in r]
        for t, r in pairs:
            mine, base = paired.setdefault(t["task"], ([], []))
            mine.append(t["greedy"])
            base.append(r["greedy"])
        if pairs:
            result["loglik_drop"] = loglikelihood.loglik_drop([t["loglik"] for t, _ in pairs],
                                                              [r["loglik"] for _, r in pairs])
    per_task = {}
    for task, (mine, base) in paired.items():
        per_task[task] = None if not any(base) else scoring.recovery_by_task({task: (mine, base)}, spec["seed"])[task]
    verdict = loglikelihood.screen_verdict(gate, per_task, spec["margin"])
    result.update({"prune": verdict.prune, "mean": verdict.mean, "reason": verdict.reason,
                   "threshold": gate.threshold, "margin": spec["margin"],
                   "per_task": {t: (None if e is None else e.point) for t, e in per_task.items()}})
    return result


def run(model, tokenizer, spec: Mapping[str, Any], reference: Sequence[Mapping] | None) -> dict[str, Any]:
    """Score the compressed model in memory; raise PrunedBeforeServing when it cannot reach the gate."""
    started = time.perf_counter()
    model.eval()
    trial = score(model, tokenizer, spec, "trial")
    result = judge(spec, trial, reference)
    result["seconds"] = time.perf_counter() - started
    result["items"] = len(trial)
    if result["prune"]:
        raise PrunedBeforeServing(result["reason"], result)
    return result
