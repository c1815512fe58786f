"""The pre-serve screen's pure maths: lm-evaluation-harness's loglikelihood score, where a label sits
in an answer, the verdict, and the screen's judgement of scored rows (no model)."""

import math

import numpy as np
import pytest

from objectives.loglikelihood import (carrier, label_span, loglik_drop, past_budget, score_continuation,
                                      scored_tokens, screen_verdict)
from objectives.recovery import Gate, RecoveryEstimate
from search.compress import screen


def _rows(*probs):
    return np.log(np.array(probs, dtype=float))


def test_a_continuation_is_correct_when_every_token_is_the_argmax_and_its_loglik_is_the_sum():
    rows = _rows([0.7, 0.2, 0.1], [0.1, 0.6, 0.3])
    got = score_continuation(rows, [0, 1])
    assert got.greedy and got.n_tokens == 2
    assert got.loglik == pytest.approx(math.log(0.7) + math.log(0.6))
    missed = score_continuation(rows, [0, 2])  # the second token is not the argmax
    assert not missed.greedy and missed.loglik == pytest.approx(math.log(0.7) + math.log(0.3))


def test_a_tie_for_the_argmax_counts_as_greedy_and_bad_shapes_are_refused():
    assert score_continuation(_rows([0.5, 0.5]), [1]).greedy
    with pytest.raises(ValueError):
        score_continuation(_rows([0.5, 0.5]), [0, 1])
    with pytest.raises(ValueError):
        score_continuation(np.zeros((0, 3)), [])


def test_the_label_is_found_where_each_scorer_reads_it():
    text = "The capital of France is Paris."
    assert text[slice(*label_span(text, ["paris"], "contains"))] == "Paris"
    assert label_span("Parisian food", ["Paris"], "contains") is None  # whole words only
    assert label_span("It is New  York", ["new york"], "contains") == (6, 15)
    assert "3 + 9 = 12"[slice(*label_span("3 + 9 = 12", ["12"], "last_number"))] == "12"
    assert label_span("3 + 9 = 12", ["9"], "last_number") is None  # only the last number counts
    assert label_span("about 1,200.", ["1200"], "last_number") == (6, 11)
    assert label_span("  cats ", ["cats"], "exact_match") == (2, 6)
    assert label_span("dogs", ["cats"], "exact_match") is None


def test_the_carrier_is_the_references_answer_up_to_its_label_else_the_bare_label():
    assert carrier("The plural of cat is cats, always.", ["cats"], "contains") == \
        ("The plural of cat is cats", 21, 25, True)
    assert carrier("3 + 9 = 22", ["12"], "last_number") == ("12", 0, 2, False)
    assert carrier(None, [" Paris "], "contains") == ("Paris", 0, 5, False)


def test_the_scored_tokens_are_those_overlapping_the_label_and_a_label_past_the_budget_is_missed():
    # "The| capital| is| Paris|." with a leading-space token for Paris
    offsets = [(0, 3), (3, 11), (11, 14), (14, 20), (20, 21)]
    assert scored_tokens(offsets, 15, 20) == [3]
    assert scored_tokens(offsets, 4, 14) == [1, 2]
    assert scored_tokens([(0, 0), (0, 2)], 0, 2) == [1]  # an empty special-token span is never scored
    assert past_budget(16, 16) and not past_budget(15, 16)


def test_the_verdict_prunes_only_under_the_gate_less_its_margin():
    gate = Gate(0.8)
    est = lambda v: RecoveryEstimate(v, v, v)  # noqa: E731
    assert screen_verdict(gate, {"a": est(0.5), "b": est(0.8)}, 0.1).prune  # mean 0.65 < 0.7
    kept = screen_verdict(gate, {"a": est(0.6), "b": est(0.9)}, 0.1)  # mean 0.75 >= 0.7
    assert not kept.prune and kept.mean == pytest.approx(0.75) and "margin 0.1" in kept.reason
    # A task the reference scores 0 on has no recovery: it counts as 1 and never prunes.
    assert not screen_verdict(gate, {"a": None, "b": est(0.45)}, 0.1).prune
    strict = Gate(0.5, per_task_min=0.6)
    assert screen_verdict(strict, {"a": est(0.4), "b": est(1.0)}, 0.1).prune  # a task under 0.6 - 0.1
    assert not screen_verdict(strict, {"a": est(0.55), "b": est(1.0)}, 0.1).prune
    assert not screen_verdict(gate, {}, 0.1).prune


def test_the_loglik_drop_is_what_the_trial_loses_per_item():
    assert loglik_drop([-2.0, -1.0], [-1.0, -1.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        loglik_drop([-1.0], [])


def _spec(quality, threshold=0.8, margin=0.1):
    return {"quality": quality, "margin": margin, "seed": 0, "gate": {"threshold": threshold, "per_task_min": None}}


def test_the_screen_judges_label_rows_against_the_references_as_recovery_per_task():
    trial = [{"task": "a", "greedy": 1.0, "loglik": -1.0}, {"task": "a", "greedy": 0.0, "loglik": -3.0},
             {"task": "b", "greedy": 0.0, "loglik": -2.0}, {"task": "b", "greedy": 1.0, "loglik": -1.0}]
    reference = [{"task": "a", "greedy": 1.0, "loglik": -0.5}, {"task": "a", "greedy": 1.0, "loglik": -0.5},
                 {"task": "b", "greedy": 0.0, "loglik": -2.0}, {"task": "b", "greedy": 1.0, "loglik": -1.0}]
    got = screen.judge(_spec("labels"), trial, reference)
    assert got["per_task"] == {"a": 0.5, "b": 1.0} and got["mean"] == pytest.approx(0.75)
    assert not got["prune"] and got["loglik_drop"] == pytest.approx((0.5 + 2.5) / 4)
    assert screen.judge(_spec("labels", margin=0.0), trial, reference)["prune"]
    # Rows without a label score (none could be read) are left out on both sides.
    assert screen.judge(_spec("labels"), trial + [{"task": "a"}], reference + [{"task": "a", "greedy": 1.0,
                                                                                 "loglik": 0.0}])["mean"] == 0.75


def test_the_screen_judges_fidelity_rows_as_the_served_score_does():
    rows = [{"task": "a", "top1": 0.4, "kl": 1.0}, {"task": "a", "top1": 0.6, "kl": 0.5},
            {"task": "b", "top1": 0.5, "kl": 0.2}]
    got = screen.judge(_spec("fidelity"), rows, None)
    assert got["per_task"] == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)} and got["prune"]
    assert got["top1_agreement"] == pytest.approx(0.5) and got["topk_kl"] == pytest.approx(1.7 / 3)


def test_a_clear_pass_skips_the_served_screen_and_a_close_one_keeps_it():
    result = {"prune": False, "mean": 0.95, "threshold": 0.8, "margin": 0.15}
    assert screen.confident(result)
    assert not screen.confident({**result, "mean": 0.7})
    assert not screen.confident(None) and not screen.confident({**result, "prune": True})
    assert screen.metrics(None) == {}
    assert screen.metrics({**result, "seconds": 3.0, "loglik_drop": 0.1}) == \
        {"pre_serve_recovery": 0.95, "pre_serve_screen_s": 3.0, "pre_serve_loglik_drop": 0.1}
