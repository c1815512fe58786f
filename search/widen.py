"""A study carried into a wider space: its measured trials become the first trials of a new study.

Optuna keeps a categorical's choices for the life of a study, so a space that must take more values
(a serving setting the old one could not reach) is a new study; the old one's trials, minutes of GPU
each, need not be paid again. A trial is carried only where the new space would run exactly
the configuration it measured: a sampled trial whose parameters the new space samples into that same
configuration, a preset with the new space's fixed settings, the reference as the new space's
reference. Anything else is refused, naming the trial, before the new study is made.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FixedTrial, FrozenTrial, TrialState

from search import config as cfg
from search import space as space_mod
from search.dedupe import REFERENCE_PRESET
from search.summaries import PRESETS_OUTSIDE_SPACE

WIDENED_FROM = "widened_from"
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# The definition's keys that describe the space (and the --sets pinning it), not the job: the first run of
# the new study sets them again.
_SPACE_KEYS = ("space", "choices_here", "pinned")


def _plain(value: Any) -> Any:
    """As the storage gives a value back (lists, not tuples), so that two configurations compare."""
    return json.loads(json.dumps(value, default=str))


def carried_params(space: space_mod.Space, trial: FrozenTrial) -> dict[str, Any]:
    """The trial's parameters as the new space samples them; raises ConfigError naming the trial
    where the new space would run another configuration than the one the trial measured."""
    measured = trial.user_attrs.get("config")
    where = f"trial {trial.number}"
    if not measured:  # refused before a configuration was made (infeasible): its parameters are all it has
        searched = {p.name: p for p in space.params}
        outside = [f"{name}={value!r}" for name, value in trial.params.items()
                   if name not in searched or not searched[name].takes(value)]
        if outside:
            raise cfg.ConfigError(f"{where} took {', '.join(outside)}, which {space.path} never samples")
        return dict(trial.params)
    preset = trial.user_attrs.get("preset")
    own = space.reference if preset == REFERENCE_PRESET else {}  # the reference's own section wins over fixed
    fixed_differs = [f"{key}={measured.get(key)!r} (the space fixes {value!r})" for key, value in space.fixed.items()
                     if key in measured and key not in own and _plain(measured[key]) != _plain(value)]
    if fixed_differs:
        raise cfg.ConfigError(f"{where} ran {fixed_differs[0]}: its price is of another job or machine")
    active = [p for p in space.params if p.name in measured and p.active(measured)]
    outside = [f"{p.name}={measured[p.name]!r}" for p in active if not p.takes(measured[p.name])]
    if outside and not preset:  # a preset's values outside the space are run as they are
        raise cfg.ConfigError(f"{where} ran {outside[0]}, which {space.path} never samples")
    params = {p.name: measured[p.name] for p in active if p.takes(measured[p.name])}
    if preset == REFERENCE_PRESET:
        again = space.reference_config().flat()
    else:
        try:
            again = space.sample(FixedTrial(params), measured if preset else None).flat()
        except ValueError as exc:  # FixedTrial: an active parameter the trial never took
            raise cfg.ConfigError(f"{where} has no value the space can sample for an active parameter ({exc})") from None
        except space_mod.Infeasible as exc:
            raise cfg.ConfigError(f"{where}: {space.path} refuses its configuration ({exc})") from None
    differs = sorted(key for key in {*again, *measured} if _plain(again.get(key)) != _plain(measured.get(key)))
    if differs:
        key = differs[0]
        raise cfg.ConfigError(f"{where} measured {key}={measured.get(key)!r}, which {space.path} would run as "
                              f"{again.get(key)!r}" + (f" ({len(differs) - 1} more settings differ)" if len(differs) > 1 else ""))
    return params


def carried_trials(source: optuna.Study, space: space_mod.Space) -> list[FrozenTrial]:
    """Every trial of `source` as a trial of `space`, in order (so that their numbers, which retries
    and answered duplicates refer to, stay the same); all checked before anything is written."""
    trials = source.get_trials(deepcopy=False)
    running = [t.number for t in trials if t.state not in _FINISHED]
    if running:
        raise cfg.ConfigError(f"study {source.study_name!r} has trials not finished ({', '.join(map(str, running[:5]))}"
                              f"{' ...' if len(running) > 5 else ''}): widen a study no worker is running")
    distributions = {p.name: p.distribution() for p in space.params}
    copies = []
    for trial in trials:
        params = carried_params(space, trial)
        copies.append(FrozenTrial(
            # trial_id: any; the storage gives the copy its own
            number=trial.number, trial_id=trial.number, state=trial.state, value=None, values=trial.values,
            datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete, params=params,
            distributions={name: distributions[name] for name in params}, user_attrs=trial.user_attrs,
            system_attrs=trial.system_attrs, intermediate_values=trial.intermediate_values))
    return copies


def widen(source: optuna.Study, target: optuna.Study, space: space_mod.Space, copies: list[FrozenTrial]) -> None:
    """Write `copies` (carried_trials' answer) into the empty study `target`, with the study's own
    records (the baseline, its job and definition, the presets it enqueued), the definition naming
    the new space."""
    if target.get_trials(deepcopy=False):
        raise cfg.ConfigError(f"study {target.study_name!r} holds trials already: widen into a new study name")
    if len(source.directions) != len(target.directions):
        raise cfg.ConfigError(f"study {target.study_name!r} has {len(target.directions)} objectives, "
                              f"{source.study_name!r} {len(source.directions)}: give the same --sampler")
    for key, value in source.user_attrs.items():
        if key == "definition":
            value = {k: v for k, v in value.items() if k not in _SPACE_KEYS} | {"space": space.digest()}
        if key != PRESETS_OUTSIDE_SPACE:  # said again by the next run, of the new space
            target.set_user_attr(key, value)
    target.set_user_attr(WIDENED_FROM, {"study": source.study_name,
                                        "space": source.user_attrs.get("definition", {}).get("space"),
                                        "trials": len(copies)})
    target.add_trials(copies)


def carry_baselines(source_dir: Path, target_dir: Path) -> list[Path]:
    """The reference's answers (baseline-KEY.json) the source study made, into the new study's folder:
    the same reference on the same model, so the new study's first run does not serve it again."""
    carried = []
    for path in sorted(source_dir.glob("baseline-*.json")):
        if not (target_dir / path.name).exists():
            shutil.copy2(path, target_dir / path.name)
            carried.append(target_dir / path.name)
    return carried
