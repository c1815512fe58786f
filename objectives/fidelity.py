"""Label-free agreement of a trial model with the baseline model.

Inputs are per-position top-k logprobs as vLLM returns them in ``prompt_logprobs``: a list with one
entry per prompt position, each None (vLLM gives None for the first position) or a dict mapping
token id (int, or str after JSON) to either a float logprob or a dict such as
``{"logprob": -0.1, "rank": 1, "decoded_token": "x"}`` (the OpenAI server's JSON); objects with a
``.logprob`` attribute (vLLM's ``Logprob``) are accepted too. To compare several prompts,
concatenate their position lists: every position weighs the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from objectives.scorers import normalize_answer

Position = Mapping[Any, Any] | None


def _logprob(value: Any) -> float:
    if isinstance(value, Mapping):
        return float(value["logprob"])
    if hasattr(value, "logprob"):
        return float(value.logprob)
    return float(value)


def _parse(position: Position) -> dict[str, float] | None:
    """token id (as str, so 5 and "5" agree) -> finite logprob; None when nothing is usable."""
    if position is None:
        return None
    # Non-finite logprobs (-inf for impossible tokens) carry no usable mass or floor.
    parsed = {str(token): lp for token, value in position.items() if math.isfinite(lp := _logprob(value))}
    return parsed or None


def _pairs(
    baseline_positions: Sequence[Position], trial_positions: Sequence[Position]
) -> list[tuple[dict[str, float], dict[str, float]]]:
    if len(baseline_positions) != len(trial_positions):
        raise ValueError(
            f"baseline has {len(baseline_positions)} positions, trial has {len(trial_positions)}: "
            "they must come from the same prompts"
        )
    pairs = []
    for b, t in zip(baseline_positions, trial_positions, strict=True):
        pb, pt = _parse(b), _parse(t)
        if pb is not None and pt is not None:
            pairs.append((pb, pt))
    if not pairs:
        raise ValueError("no position has logprobs on both sides")
    return pairs


def _argmax(position: dict[str, float]) -> str:
    # Ties break on the token id so the result does not depend on dict order.
    return max(position.items(), key=lambda kv: (kv[1], kv[0]))[0]


def top1_agreement(baseline_positions: Sequence[Position], trial_positions: Sequence[Position],
                   missed_tail: int = 0) -> float:
    """Fraction of positions (present on both sides) where both models' most likely token agrees.

    The last ``missed_tail`` positions count as disagreements whatever their logprobs: answer tokens
    past a trial's token budget, which it would never have generated."""
    pairs = _pairs(baseline_positions, trial_positions)
    # Positions at or after `first_missed` are in the tail; pairs skip None positions, so count by index.
    first_missed = len(baseline_positions) - max(0, missed_tail)
    kept = sum(1 for b, t in zip(baseline_positions[:max(0, first_missed)], trial_positions)
               if _parse(b) is not None and _parse(t) is not None)
    return sum(_argmax(b) == _argmax(t) for b, t in pairs[:kept]) / len(pairs)


def common_suffix(baseline_positions: Sequence[Position], trial_positions: Sequence[Position]
                  ) -> tuple[list[Position], list[Position]]:
    """The positions both prompts end with, when one prompt has a longer prefix than the other (a
    system turn the trial adds or changes): the last min(len) positions of each."""
    n = min(len(baseline_positions), len(trial_positions))
    return list(baseline_positions[len(baseline_positions) - n:]), list(trial_positions[len(trial_positions) - n:])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.logaddexp.reduce(x)


def topk_kl(
    baseline_positions: Sequence[Position],
    trial_positions: Sequence[Position],
    floor_logprob: float | None = None,
) -> float:
    """Mean over positions of KL(baseline || trial), approximated on the baseline's top-k tokens.

    At each position both distributions are restricted to the tokens in the baseline's entry (its
    top-k, plus the prompt token vLLM adds) and renormalised over that set. A token missing from
    the trial's top-k gets ``floor_logprob`` if given, else the trial's smallest logprob at that
    position minus log(2): it is known only to be below everything the trial listed, and halving
    the smallest listed probability is a guess, not a bound.

    This is an approximation: mass either model puts outside the baseline's top-k is ignored, so a
    trial that moves probability to a new token while keeping the relative order of the baseline's
    tokens scores near 0; ``top1_agreement`` catches the common case of that.
    """
    total = 0.0
    pairs = _pairs(baseline_positions, trial_positions)
    for b, t in pairs:
        tokens = list(b)
        floor = floor_logprob if floor_logprob is not None else min(t.values()) - math.log(2)
        log_p = _log_softmax(np.array([b[tok] for tok in tokens]))
        log_q = _log_softmax(np.array([t.get(tok, floor) for tok in tokens]))
        # KL between two distributions on the same set is >= 0; clip float round-off.
        total += max(0.0, float(np.sum(np.exp(log_p) * (log_p - log_q))))
    return total / len(pairs)


def answer_agreement(baseline_answers: Sequence[str | None], trial_answers: Sequence[str | None]) -> float:
    """Fraction of items where the two models' answers match after answer normalisation.

    Items where either answer is None (a failed request) are skipped.
    """
    if len(baseline_answers) != len(trial_answers):
        raise ValueError(f"baseline has {len(baseline_answers)} answers, trial has {len(trial_answers)}")
    pairs = [
        (b, t)
        for b, t in zip(baseline_answers, trial_answers, strict=True)
        if b is not None and t is not None
    ]
    if not pairs:
        raise ValueError("no item has an answer on both sides")
    return sum(normalize_answer(b) == normalize_answer(t) for b, t in pairs) / len(pairs)
