"""Quality before serving, by teacher forcing (plain functions, no model): how lm-evaluation-harness
scores a loglikelihood task, where a labelled answer sits in a written answer, and the pre-serve
screen's verdict.

lm-evaluation-harness scores a (context, continuation) request by one forward pass over both: the
continuation's log-likelihood is the sum of its tokens' logprobs, and it counts as correct
(``is_greedy``) when every one of its tokens is the argmax at its position: the labelled answer is
what greedy decoding would have written there. ``score_continuation`` is that, on the logprob rows
that predict the continuation's tokens.

A chat model does not begin its answer with the bare label ("The capital of France is Paris."), so
a label forced right after the assistant turn opens tests a phrasing the model never uses. The
screen forces the label where the reference's own answer puts it: ``carrier`` cuts the reference's
answer just after the label (as the item's scorer finds it) and marks the label's characters, which
are the scored tokens. Where the reference's answer has no label (the reference was wrong), the
bare label is forced, as lm-evaluation-harness would.

The verdict (``screen_verdict``) reads recovery as the gate does (objectives/recovery.py), with the
threshold lowered by a margin calibrated against the served gate (bench/results/pre-serve-screen-2026-12-06.json; its script is retired, bench/README.md), so
that the screen prunes no trial the served gate would pass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from objectives.recovery import Gate, RecoveryEstimate
from objectives.scorers import _WRITTEN_NUMBER, normalize_answer, parse_number


@dataclass(frozen=True)
class ContinuationScore:
    greedy: bool  # every continuation token is its position's argmax (lm-evaluation-harness's is_greedy)
    loglik: float  # sum of the continuation tokens' logprobs
    n_tokens: int


def score_continuation(logprobs: np.ndarray | Sequence[Sequence[float]], targets: Sequence[int]
                       ) -> ContinuationScore:
    """lm-evaluation-harness's loglikelihood score. ``logprobs[i]`` is the (log-softmax) row of the
    position that predicts ``targets[i]``, one row per continuation token. Ties for the argmax
    count as greedy when the target is among them (the harness's argmax takes the first index; a
    tie is float noise between two equally likely tokens either way)."""
    rows = np.asarray(logprobs, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] != len(targets):
        raise ValueError(f"need one logprob row per continuation token: {rows.shape} rows for {len(targets)} tokens")
    if not len(targets):
        raise ValueError("an empty continuation has no score")
    picked = rows[np.arange(len(targets)), np.asarray(targets)]
    greedy = bool(np.all(picked >= rows.max(axis=1)))
    return ContinuationScore(greedy, float(picked.sum()), len(targets))


def label_span(text: str, references: Sequence[str], scorer: str) -> tuple[int, int] | None:
    """The character span of the labelled answer in ``text`` as ``scorer`` finds it
    (objectives/scorers.py), or None where the scorer would score ``text`` 0:

    - ``contains``: the first whole-word occurrence of a reference (case and spacing as written);
    - ``last_number``: the last number written, when it equals a reference;
    - any other scorer: the whole answer, stripped, when the scorer accepts it."""
    from objectives.scorers import get_scorer

    refs = [r for r in references if isinstance(r, str)]
    if scorer == "contains":
        spans = []
        for ref in refs:
            words = normalize_answer(ref).split()
            if not words:
                continue
            pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
            found = re.search(pattern, text, flags=re.IGNORECASE)
            if found:
                spans.append(found.span())
        return min(spans) if spans else None
    if scorer == "last_number":
        numbers = list(_WRITTEN_NUMBER.finditer(text))
        if not numbers:
            return None
        last = numbers[-1]
        value = parse_number(last.group().rstrip(","))
        if value is None or not any(parse_number(r) == value for r in refs):
            return None
        return last.start(), last.start() + len(last.group().rstrip(","))
    if not get_scorer(scorer)(text, list(refs)):
        return None
    start = len(text) - len(text.lstrip())
    return start, len(text.rstrip())


def carrier(reference_answer: str | None, references: Sequence[str], scorer: str) -> tuple[str, int, int, bool]:
    """(text to force as the answer, label start, label end, whether the label is the reference's):
    the reference's answer up to the end of its label, or the bare first reference where the
    reference's answer has none."""
    span = label_span(reference_answer, references, scorer) if reference_answer else None
    if span is None:
        label = str(references[0]).strip()
        return label, 0, len(label), False
    return reference_answer[:span[1]], span[0], span[1], True


def scored_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens (character ``offsets`` of the forced answer) that overlap [start, end):
    the label's tokens, with whatever token carries the space or quote in front of it."""
    return [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]


def past_budget(label_end_token: int, max_tokens: int) -> bool:
    """Whether a label ending at answer token ``label_end_token`` (0-based) lies past a trial's token
    budget: the trial would have stopped before writing it, so the item scores 0."""
    return label_end_token >= max_tokens


# --------------------------------------------------------------------------------------------
# The verdict


@dataclass(frozen=True)
class Verdict:
    prune: bool
    mean: float  # the screen's mean recovery over tasks (tasks without a reference score count 1)
    reason: str


def screen_verdict(gate: Gate, per_task: Mapping[str, RecoveryEstimate | None], margin: float) -> Verdict:
    """Prune when the screen's mean recovery (point estimates) is under the gate's threshold by more
    than ``margin``, or a task's under ``per_task_min`` by more than it. A task the reference scores
    0 on (None) has no recovery: it counts as 1, so it never prunes (the served gate judges it)."""
    values = {task: (1.0 if est is None else est.point) for task, est in per_task.items()}
    if not values:
        return Verdict(False, float("nan"), "nothing to score")
    mean = sum(values.values()) / len(values)
    lowered = Gate(max(0.0, gate.threshold - margin), "point",
                   None if gate.per_task_min is None else max(0.0, gate.per_task_min - margin))
    outcome = lowered.evaluate({t: RecoveryEstimate(v, v, v) for t, v in values.items()})
    weakest = min(values, key=values.get)
    reason = (f"pre-serve screen: mean recovery {mean:.3f} (weakest {weakest} {values[weakest]:.3f}) "
              f"vs gate {gate.threshold:g} less margin {margin:g}")
    return Verdict(not outcome.passed, mean, reason)


def loglik_drop(trial: Sequence[float], reference: Sequence[float]) -> float:
    """Mean per-item log-likelihood the trial loses against the reference (nats; > 0 = worse)."""
    t, r = np.asarray(trial, dtype=float), np.asarray(reference, dtype=float)
    if t.shape != r.shape or t.size == 0:
        raise ValueError(f"paired log-likelihoods needed; got {t.shape} and {r.shape}")
    return float(np.mean(r - t))
