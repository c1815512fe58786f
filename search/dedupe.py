"""Nothing measured twice by accident: a configuration a complete trial already measured is not served
again (issue 26, item 3).

A sampler that takes measurement noise for an improvement proposes the same configuration again and
again (TPE spent 5 of the last 8 trials of the README's first study on the reference's own
configuration). Such a trial is answered from the earlier measurement instead: it tells Optuna the
same values and constraints, records `duplicate_of` = the earlier trial's number, and compresses,
serves and measures nothing. A study that wants repeats (`search run --repeat-measured`) serves it.

"The same configuration" is the same flattened TrialConfig (the trial's `config` user attribute, as
the storage gives it back), every setting included: request-level ones and the space's fixed ones.
The reference trial (preset "reference", every study's first) is a measured configuration like any
other.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from search.summaries import DUPLICATE_OF, measured
from search.errors import SearchError

# The preset name of the reference configuration's trial, every study's first (search/study.py enqueues it).
REFERENCE_PRESET = "reference"


class AlreadyMeasured(SearchError):
    """Raised inside a trial whose configuration an earlier complete trial measured."""

    def __init__(self, earlier: FrozenTrial):
        super().__init__(f"the configuration of trial {earlier.number}, already measured")
        self.earlier = earlier


def config_key(config: Mapping[str, Any]) -> str:
    """A flattened configuration as one comparable string: as the storage gives it back (tuples are
    lists), keys sorted."""
    return json.dumps(config, sort_keys=True, default=str)


def first_measurement(trials: Iterable[FrozenTrial], config: Mapping[str, Any], before: int | None = None
                      ) -> FrozenTrial | None:
    """The lowest-numbered trial among `trials` (measured ones: complete, run, no duplicate) that ran
    `config`, and numbered below `before` when given; None if none did."""
    key = config_key(config)
    found = [t for t in trials if (before is None or t.number < before)
             and t.user_attrs.get("config") is not None and config_key(t.user_attrs["config"]) == key]
    return min(found, key=lambda t: t.number, default=None)


def check_not_measured(study: optuna.Study, config: Mapping[str, Any], number: int) -> None:
    """Raise AlreadyMeasured when a complete trial of `study` other than `number` measured `config`."""
    earlier = first_measurement((t for t in measured(study) if t.number != number), config)
    if earlier is not None:
        raise AlreadyMeasured(earlier)


def answer(earlier: FrozenTrial, multi_objective: bool) -> float | tuple[float, ...]:
    """What the duplicate tells Optuna: the earlier trial's values."""
    return tuple(earlier.values) if multi_objective else earlier.values[0]


def duplicates(study: optuna.Study) -> dict[int, int]:
    """Trial number -> the trial whose measurement it repeated, for every duplicate of the study."""
    return {t.number: t.user_attrs[DUPLICATE_OF] for t in study.get_trials(deepcopy=False)
            if DUPLICATE_OF in t.user_attrs}


def reference_config(study: optuna.Study) -> Mapping[str, Any] | None:
    """The reference configuration, flattened: the reference trial's, else the baseline's."""
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("preset") == REFERENCE_PRESET and t.user_attrs.get("config") is not None:
            return t.user_attrs["config"]
    return study.user_attrs.get("baseline", {}).get("reference")


def is_reference(trial: FrozenTrial, reference: Mapping[str, Any] | None) -> bool:
    """Whether `trial` ran the reference configuration: the reference's own trial, or one that ran
    the same configuration (a repeat the study asked for)."""
    if trial.user_attrs.get("preset") == REFERENCE_PRESET:
        return True
    config = trial.user_attrs.get("config")
    return reference is not None and config is not None and config_key(config) == config_key(reference)


REFERENCE_IS_BEST = ("the best feasible trial ran the reference configuration itself: a saving of zero by "
                     "construction (no configuration searched so far uses less energy per request)")
