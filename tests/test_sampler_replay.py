"""bench/sampler_replay.py's arithmetic: the ridge fit and its leave-one-out residuals, the censored
median, the configurations a space enumerates, and one replay through the product's sampler."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import sampler_replay as sr  # noqa: E402
from search import space as space_mod  # noqa: E402

SPACE = """
model: toy
fixed: {workload.n_requests: 8}
params:
  compress.scheme: {choices: [none, w4a16]}
  compress.method: {choices: [rtn, gptq], when: {compress.scheme: [w4a16]}}
  serve.max_num_seqs: {choices: [4, 8]}
  serve.max_model_len: {choices: [1024, 4096]}
constraints:
  - expr: "serve.max_num_seqs * serve.max_model_len <= 16384"
"""


@pytest.fixture()
def space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return space_mod.load(path)


def test_enumeration_applies_conditions_and_constraints(space):
    runnable, refused = sr.enumerate_keys(space)
    # scheme none: 2 x 2 = 4; w4a16: 2 methods x 4 = 8; of the 12, seqs 8 x len 4096 breaks the constraint (3 of them)
    assert len(runnable) + len(refused) == 12 and len(refused) == 3
    assert ("none", None, 4, 1024) in runnable and ("w4a16", "gptq", 8, 1024) in runnable
    assert all(key[2] * key[3] > 16384 for key, _ in refused)


def test_ridge_fits_an_additive_function_and_its_loo_matches_refitting(space):
    keys, _ = sr.enumerate_keys(space)
    x, _ = sr.additive_design(space, keys)
    truth = np.array([1.0 + (k[0] == "w4a16") * 0.5 + (k[1] == "gptq") * 0.25 + (k[2] == 8) * -0.3 for k in keys])
    y = truth + np.random.default_rng(0).normal(0, 0.01, len(keys))
    w, loo = sr.ridge(x, y, alpha=1e-6)
    assert np.allclose(x @ w, truth, atol=0.03)
    for i in range(len(keys)):  # the closed form is the residual of a fit without row i
        keep = np.arange(len(keys)) != i
        w_i, _ = sr.ridge(x[keep], y[keep], alpha=1e-6)
        assert math.isclose(loo[i], y[i] - x[i] @ w_i, abs_tol=1e-6)


def test_median_and_quantiles_rank_censored_runs_last():
    assert sr.median([3, 1, 2]) == 2
    assert sr.median([4, 1, 3, 2]) == 2.5
    assert sr.median([1, None, None]) is None  # more than half never got there
    assert sr.median([1, 2, None]) == 2
    assert sr.median([1, 2, 3, None]) == 2.5
    assert sr.quantile([5, 1, None, 3], 0.25) == 1 and sr.quantile([5, 1, None, 3], 0.75) == 5
    assert sr.expected_random_position(263, 1) == 132
    assert sr.median_ci([2, 2, 2, 2]) == [2.0, 2.0] and sr.median_ci([1, None, None])[1] is None
    assert sr.ratio_ci([1, 2, 3], [2, 4, 6]) == [0.5, 0.5]  # paired: every resample has the same ratio


def test_a_replay_finds_the_single_target_through_the_product_sampler(space):
    measured = []
    for key in sr.enumerate_keys(space)[0]:  # energy falls with 8 seqs and w4a16; gptq fails the gate
        energy = 1.0 * (0.5 if key[2] == 8 else 1.0) * (0.7 if key[0] == "w4a16" else 1.0) * (1.2 if key[3] == 4096 else 1)
        recovery = 0.5 if key[1] == "gptq" else 1.0
        measured.append(sr.Measured(key, energy, recovery, recovery >= sr.GATE))
    problem = sr.Problem("unit", space, measured, alpha=1e-6)
    assert problem.targets == {("w4a16", "rtn", 8, 1024)}
    for sampler in ("random", "grid", "tpe"):
        outcome = sr.replay(problem, sampler, seed=0, warm={}, budget=40)
        assert outcome.trials is not None and 1 <= outcome.distinct <= outcome.trials <= 40
    # a preset the surrogate cannot score costs a trial, told to Optuna as infeasible
    outcome = sr.replay(problem, "random", seed=0, warm={"nf4": {"compress.scheme": "bnb_nf4"}}, budget=40)
    assert outcome.infeasible >= 1
