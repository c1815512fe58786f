"""The search space: a YAML file a user edits, turned into Optuna suggestions and checked up front.

A space file has four sections (see spaces/default.yaml):
  fixed:        dotted option -> value, pinned for every trial (hardware-bound settings live here)
  params:       dotted option -> {choices: [...]} or {low, high[, step][, log]}, optional
                `when: {other.option: [values]}` makes it conditional
  constraints:  [{expr: "serve.max_num_seqs * serve.max_model_len <= 16384", why: "..."}]
  model / reference: which model, and the settings of the uncompressed baseline

The file is read as the pydantic model SpaceFile (ParamSpec, ConstraintSpec), a presets file entry by
entry as PresetEntry: a key a part does not have, or a value of the wrong shape, is one ConfigError
naming the file and the key; then each option is checked against the trial configuration's.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from search import config as cfg
from search.config import ConfigError, Infeasible  # noqa: F401  (Infeasible: re-exported)

if TYPE_CHECKING:  # Optuna is imported where a distribution is made: a space file is checked without it
    import optuna



# --- The files as typed models, validated when a file is read (their rules, one line each) -----------

def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return value


def _empty_if_none(empty: Any) -> Callable[[Any], Any]:
    """A section written with nothing under it (`fixed:`) is an empty one."""
    return lambda value: empty if value is None else value


# An integer stays one (an integer range is an IntDistribution); true is not a number.
Number = Annotated[int | float, BeforeValidator(_number)]
Options = Annotated[dict[str, Any], BeforeValidator(_empty_if_none({}))]


class _FileModel(BaseModel):
    """A part of a file the user writes: unknown keys refused, frozen once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamSpec(_FileModel):
    """One searched option: {choices: [...]} or a range {low, high[, step][, log]}; a bare list is
    its choices."""

    choices: list[Any] | None = Field(None, description="the values the sampler picks from")
    low: Number | None = Field(None, description="a range's lowest value")
    high: Number | None = Field(None, description="a range's highest value")
    step: Number | None = Field(None, description="a range's step (none: continuous, or 1 for integers)")
    log: bool = Field(False, description="sample the range on a log scale")
    when: Annotated[dict[str, Any], BeforeValidator(_empty_if_none({}))] = Field(
        default_factory=dict, description="{other.option: [values]}: searched only while those hold "
                                          "(options fixed, or params listed before this one)")

    @model_validator(mode="after")
    def _choices_or_a_range(self) -> ParamSpec:
        if "choices" in self.model_fields_set:
            if not self.choices:
                raise ValueError("choices must be a non-empty list")
            if {"low", "high", "step", "log"} & self.model_fields_set:
                raise ValueError("give either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high")
        if self.low >= self.high:
            raise ValueError(f"inverted range, low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class ConstraintSpec(_FileModel):
    """A rule every trial's configuration must meet; a bare string is its expr."""

    expr: str = Field(description="an expression over dotted options, e.g. serve.max_num_seqs * 2 <= 64")
    why: str = Field("", description="the reason, told with a trial the rule refuses")


def _shorthand(key: str) -> Callable[[Any], Any]:
    """A param given as a bare list (its choices), a constraint as a bare string (its expr)."""
    kind = list if key == "choices" else str
    return lambda value: {key: value} if isinstance(value, kind) else value


class SpaceFile(_FileModel):
    """A space file (spaces/*.yaml) as written, before its options are checked against the trial
    configuration's (`load`)."""

    description: str | None = Field(None, description="what the space is for, in words")
    model: Annotated[str, BeforeValidator(str)] = Field(
        "toy", description="the model a study of this space runs by default (--model overrides it)")
    fixed: Options = Field(default_factory=dict, description="dotted option -> value, pinned for every trial")
    params: Annotated[dict[str, Annotated[ParamSpec, BeforeValidator(_shorthand("choices"))]],
                      BeforeValidator(_empty_if_none({}))] = Field(
        default_factory=dict, description="dotted option -> its choices or range, searched in file order")
    constraints: Annotated[list[Annotated[ConstraintSpec, BeforeValidator(_shorthand("expr"))]],
                           BeforeValidator(_empty_if_none([]))] = Field(
        default_factory=list, description="rules a trial must meet, else it is infeasible")
    reference: Options = Field(default_factory=dict,
                               description="the uncompressed baseline's settings, over the fixed ones")

    @model_validator(mode="after")
    def _something_to_search(self) -> SpaceFile:
        if not self.params:
            raise ValueError("no params to search; give at least one under `params:`")
        return self


class PresetEntry(_FileModel):
    """One named configuration of a presets file (spaces/presets/seeds.yaml)."""

    source: str | None = Field(None, description="where the configuration comes from (a card, a paper)")
    config: dict[str, Any] | None = Field(None, description="dotted option -> value")

    @model_validator(mode="before")
    @classmethod
    def _config_is_a_mapping(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("config") is not None and not isinstance(data["config"], dict):
            raise ValueError(f"config must be a mapping of dotted options to values, "
                             f"got a {type(data['config']).__name__}")
        return data

    @model_validator(mode="after")
    def _has_a_config(self) -> PresetEntry:
        if self.config is None:
            raise ValueError("no config; give its options under `config:`")
        return self


# What a part of a file holds, for a message on a key it should not have: by the section it sits in.
_PARTS = {(): SpaceFile, ("params",): ParamSpec, ("constraints",): ConstraintSpec}
# What a value that is not a part's mapping should have been.
_SHAPES = {ParamSpec: "{choices: [...]} or {low: .., high: ..}", ConstraintSpec: "{expr: '...', why: '...'}",
           PresetEntry: "{source: ..., config: {...}}"}
_EXPECTED = {"dict_type": "a mapping", "list_type": "a list", "string_type": "a string",
             "bool_type": "true or false", "bool_parsing": "true or false", "invalid_key": "a string key"}


def _located(loc: tuple) -> str:
    """('params', 'serve.max_num_seqs', 'low') -> 'params.serve.max_num_seqs.low'; ints as [i]."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _validated(model: type[_FileModel], data: Any, where: str, parts: dict | None = None) -> Any:
    """`data` as `model`, or one ConfigError starting with `where`: keys the part does not have
    (all of them, with what it takes), else the first value that breaks a rule."""
    parts = parts if parts is not None else {(): model}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        parent = extra[0]["loc"][:-1]
        keys = sorted(str(e["loc"][-1]) for e in extra if e["loc"][:-1] == parent)
        part = parts.get(parent[:1] if parent else ())
        fields = sorted(part.model_fields) if part else []
        if not parent and model is SpaceFile:
            raise _error(f"{where}: unknown section(s) {keys}; expected {fields}")
        raise _error(f"{where}: " + (f"{_located(parent)}: " if parent else "") +
                     f"unknown key(s) {keys}; expected {fields}")
    error = errors[0]
    loc, kind, value = tuple(part for part in error["loc"] if part != "[key]"), error["type"], error["input"]
    if kind == "invalid_key" or "[key]" in error["loc"]:  # a name that is not a string (YAML reads `5:` as one)
        raise _error(f"{where}: " + (f"{_located(loc[:-1])}: " if loc[:-1] else "") +
                     f"the key {value!r} is not a name; write names as strings")
    prefix = f"{where}: " + (f"{_located(loc)}: " if loc else "")
    raised = error.get("ctx", {}).get("error")
    if isinstance(raised, ValueError):
        raise _error(prefix + str(raised))
    if kind == "model_type":
        part = parts.get(loc[:1]) if loc else model
        raise _error((prefix + f"expected {_SHAPES.get(part, 'a mapping')}, got {value!r}")[:300])
    if kind == "missing":
        raise _error(f"{where}: " + (f"{_located(loc[:-1])}: " if loc[:-1] else "") + f"missing key {loc[-1]!r}")
    raise _error(prefix + f"expected {_EXPECTED.get(kind, error['msg'])}, got {value!r}"[:300])


def _error(message: str) -> ConfigError:
    return ConfigError(message)



@dataclass(frozen=True)
class Param:
    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    when: dict[str, tuple] = field(default_factory=dict)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        import optuna
        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(self.choices)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high)) and (
            self.step is None or isinstance(self.step, int)
        ):
            return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def takes(self, value: Any) -> bool:
        """Whether the sampler could propose `value` for this parameter."""
        return _contains(self.distribution(), value)

    def active(self, values: dict[str, Any]) -> bool:
        return all(values.get(key) in allowed for key, allowed in self.when.items())

    def suggest(self, trial: optuna.Trial) -> Any:
        from optuna.distributions import CategoricalDistribution, IntDistribution
        dist = self.distribution()
        if isinstance(dist, CategoricalDistribution):
            return trial.suggest_categorical(self.name, dist.choices)
        if isinstance(dist, IntDistribution):
            return trial.suggest_int(self.name, dist.low, dist.high, step=dist.step, log=dist.log)
        return trial.suggest_float(self.name, dist.low, dist.high, step=dist.step, log=dist.log)


@dataclass(frozen=True)
class Constraint:
    expr: str
    why: str = ""

    def holds(self, values: dict[str, Any]) -> bool:
        return bool(_evaluate(ast.parse(self.expr, mode="eval").body, values))


@dataclass(frozen=True)
class Space:
    path: Path
    model: str
    fixed: dict[str, Any]
    params: tuple[Param, ...]
    constraints: tuple[Constraint, ...]
    reference: dict[str, Any]

    def sample(self, trial: optuna.Trial, preset: dict[str, Any] | None = None) -> cfg.TrialConfig:
        """Suggest every active parameter (in file order, so conditions see their parents).

        A preset (a seed configuration) is run as exactly as this space allows: its values inside the
        space were enqueued and come back from Optuna, values outside it are used as they are, and
        only the space's `fixed` settings override it (they pin what the hardware needs)."""
        preset = preset or {}
        inside = self.enqueue_params(preset)
        values = dict(self.fixed)
        for param in self.params:
            if param.name in preset and param.name not in inside:
                values[param.name] = preset[param.name]
            elif param.active(values):
                values[param.name] = param.suggest(trial)
        for key, value in preset.items():
            values.setdefault(key, value)
        try:
            trial_config = cfg.build(values)
        except ConfigError as exc:  # a combination the space allows and the tool cannot run
            raise Infeasible(f"invalid combination: {exc}") from None
        self.check(trial_config)
        return trial_config

    def pinned(self, values: dict[str, Any]) -> Space:
        """This space with `values` fixed for every trial and for the reference (a baseline that
        answered under other settings would be compared with trials it does not match); a pinned
        param is no longer searched."""
        return Space(self.path, self.model, {**self.fixed, **values},
                     tuple(p for p in self.params if p.name not in values), self.constraints,
                     {k: v for k, v in self.reference.items() if k not in values})

    def unavailable_choices(self, runs: Callable[[cfg.TrialConfig], None]) -> list[tuple[str, Any, str]]:
        """(param, choice, reason) for every choice that `runs` rejects as Infeasible when it alone
        changes the reference configuration (a conditional param's parents take their first
        choice that is available). Combinations are left to the per-trial check."""
        reference = {**self.fixed, **self.reference}
        available: dict[str, list] = {}
        out = []
        for param in self.params:
            if param.choices is None:
                continue
            parents = {key: next((v for v in allowed if v in available.get(key, [reference.get(key)])), None)
                       for key, allowed in param.when.items()}
            if any(value is None for value in parents.values()):
                continue  # never active here: its parents' choices cannot run
            available[param.name] = []
            for choice in param.choices:
                try:
                    runs(cfg.build({**reference, **parents, param.name: choice}))
                except Infeasible as exc:
                    out.append((param.name, choice, str(exc)))
                    continue
                except ConfigError:
                    pass  # not a valid configuration on its own; sampling decides its combinations
                available[param.name].append(choice)
        return out

    def without(self, choices: list[tuple[str, Any, str]]) -> Space:
        """This space with these (param, choice, ...) removed; a param left with no choice is refused."""
        params = []
        for param in self.params:
            gone = {choice for name, choice, *_ in choices if name == param.name}
            if gone and param.choices is not None:
                kept = tuple(c for c in param.choices if c not in gone)
                if not kept:
                    raise ConfigError(f"{self.path}: no choice of {param.name} can run here")
                param = Param(param.name, choices=kept, when=param.when)
            params.append(param)
        return Space(self.path, self.model, self.fixed, tuple(params), self.constraints, self.reference)

    def check(self, trial_config: cfg.TrialConfig) -> None:
        flat = trial_config.flat()
        for constraint in self.constraints:
            if not constraint.holds(flat):
                raise Infeasible(f"constraint {constraint.expr!r} does not hold" +
                                 (f" ({constraint.why})" if constraint.why else ""))

    def reference_config(self) -> cfg.TrialConfig:
        """The uncompressed baseline: fixed settings, then the reference section."""
        return cfg.build({**self.fixed, **self.reference, "compress.scheme": "none"})

    def digest(self) -> str:
        """What this space searches (not where its file is, nor its comments): a study keeps one."""
        content = {"fixed": self.fixed, "reference": self.reference,
                   "params": [dataclasses.asdict(p) for p in self.params],
                   "constraints": [dataclasses.asdict(c) for c in self.constraints]}
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def out_of_reach(self, preset: dict[str, Any]) -> list[tuple[str, Any, list]]:
        """(param, the preset's value, what the space samples) for each searched param the preset sets
        to a value the sampler can never propose: no sampled trial can match the preset there, so a
        preset that wins by such a value is one the search cannot find or beat on that knob."""
        values = {**self.reference_config().flat(), **preset, **self.fixed}  # as sample() sees them: fixed wins
        return [(param.name, preset[param.name], list(param.choices) if param.choices is not None
                 else [param.low, param.high])
                for param in self.params
                if param.name in preset and param.active(values) and not param.takes(preset[param.name])]

    def enqueue_params(self, preset: dict[str, Any]) -> dict[str, Any]:
        """A preset as Optuna can enqueue it: its values that lie inside this space's distributions,
        and for the params it does not name, the reference configuration's values. A seed changes
        what its card says and nothing else; the sampler does not fill its gaps at random."""
        reference = self.reference_config().flat()
        out = {}
        for param in self.params:
            value = preset[param.name] if param.name in preset else reference.get(param.name)
            if param.takes(value):
                out[param.name] = value
        return out


def _contains(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    """Whether the sampler could have suggested `value` (Optuna's own test of this is private)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not dist.low <= value <= dist.high:
        return False
    if isinstance(dist, IntDistribution) and not float(value).is_integer():
        return False
    step = getattr(dist, "step", None)
    return step is None or math.isclose((value - dist.low) / step, round((value - dist.low) / step), abs_tol=1e-8)


def load(path: str | Path) -> Space:
    """Parse and check a space file, by type and by value; every problem is a one-line ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a space file")
    if not path.is_file():
        raise ConfigError(f"space file not found: {path}")
    raw = _read_yaml(path)
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; a space needs params to search")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    written = _validated(SpaceFile, raw, str(path), _PARTS)
    keys = cfg.known_keys()
    fixed = dict(written.fixed)
    params = tuple(_param(path, name, spec, keys) for name, spec in written.params.items())
    names = {p.name for p in params}
    both = names & set(fixed)
    if both:
        raise ConfigError(f"{path}: {sorted(both)} are both fixed and searched")
    for index, param in enumerate(params):
        _check_when(path, param, params[:index], names, fixed)
    constraints = tuple(_constraint(path, c, keys) for c in written.constraints)
    reference = dict(written.reference)
    space = Space(path, written.model, fixed, params, constraints, reference)
    # Every fixed value builds a valid config, and so does every choice and range end, each with
    # its `when:` parents at a value that activates it. Values that are only wrong together are
    # left to sampling, which records such a trial as infeasible.
    try:
        cfg.build(fixed)
        cfg.build({**fixed, **reference})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    by_name = {p.name: p for p in params}
    for param in params:
        parents = {key: fixed[key] if key in fixed else allowed[0] for key, allowed in param.when.items()}
        for label, value in _values(param):
            try:
                cfg.build({**fixed, **parents, param.name: value})
            except cfg.CombinationError:
                pass
            except ConfigError as exc:
                raise ConfigError(f"{path}: params.{param.name}: {label} {value!r}: {exc}") from None
    reference_values = space.reference_config().flat()
    for constraint in constraints:
        try:
            constraint.holds(reference_values)
        except Exception as exc:  # a constraint that cannot be evaluated would fail every trial
            raise ConfigError(f"{path}: constraint {constraint.expr!r} cannot be evaluated on the reference "
                              f"configuration: {type(exc).__name__}: {exc}") from None
    named_tasks = [fixed.get("workload.tasks"), reference.get("workload.tasks"),
                   *((by_name["workload.tasks"].choices or ()) if "workload.tasks" in by_name else ())]
    check_tasks(path, [task for tasks in named_tasks if tasks for task in tasks])
    return space


def _values(param: Param) -> list[tuple[str, Any]]:
    if param.choices is not None:
        return [("choice", choice) for choice in param.choices]
    return [("low", param.low), ("high", param.high)]


def _check_when(path: Path, param: Param, earlier: tuple[Param, ...], names: set[str], fixed: dict) -> None:
    """Conditions name a fixed option or a param listed before (sampling runs in file order), with
    values that option can take."""
    where = f"{path}: params.{param.name}.when"
    before = {p.name: p for p in earlier}
    for key, allowed in param.when.items():
        if key in fixed:
            if fixed[key] not in allowed:
                raise ConfigError(f"{where}: {key} is fixed to {fixed[key]!r}, so {param.name} is never searched")
            continue
        if key not in names:
            raise ConfigError(f"{where} refers to {key!r}, which is neither a param nor fixed")
        if key not in before:
            raise ConfigError(f"{where} refers to {key!r}, which is listed after it; list {key} first")
        parent = before[key]
        impossible = [v for v in allowed if not _can_take(parent, v)]
        if impossible:
            takes = list(parent.choices) if parent.choices is not None else f"[{parent.low}, {parent.high}]"
            raise ConfigError(f"{where}: {key} never takes {impossible} (it takes {takes})")


def _can_take(param: Param, value: Any) -> bool:
    if param.choices is not None:
        return value in param.choices
    return isinstance(value, (int, float)) and not isinstance(value, bool) and param.low <= value <= param.high


def check_tasks(path: Path | str, names: list[str]) -> None:
    """Task names resolve in objectives/tasks/ before the baseline, not after it."""
    if not names:
        return
    from objectives.tasks import TEXT_TASK_DIR, load_registry, resolve_task
    known = {**load_registry(), **load_registry(TEXT_TASK_DIR)}
    for name in names:
        if name.endswith((".yaml", ".yml")):  # a user's own task file
            try:
                resolve_task(name)
            except ValueError as exc:
                raise ConfigError(f"{path}: workload.tasks: {exc}") from None
    unknown = sorted(n for n in set(names) - set(known) if not n.endswith((".yaml", ".yml")))
    if unknown:
        raise ConfigError(f"{path}: workload.tasks: unknown task(s) {unknown}; known: {sorted(known)}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError) as exc:  # unreadable, a folder, not text
        raise ConfigError(f"{path}: cannot be read as a YAML text file: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _param(path: Path, name: str, spec: ParamSpec, keys: dict[str, Any]) -> Param:
    if name not in keys:
        raise ConfigError(f"{path}: params.{name}: unknown option; known options: {', '.join(sorted(keys))}")
    when = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in spec.when.items()}
    if spec.choices is not None:
        return Param(name, choices=tuple(tuple(c) if isinstance(c, list) else c for c in spec.choices), when=when)
    return Param(name, low=spec.low, high=spec.high, step=spec.step, log=spec.log, when=when)


def _constraint(path: Path, spec: ConstraintSpec, keys: dict[str, Any]) -> Constraint:
    try:
        tree = ast.parse(spec.expr, mode="eval").body
    except SyntaxError:
        raise ConfigError(f"{path}: constraint {spec.expr!r} is not a valid expression") from None
    for name in _names(tree):
        if name not in keys:
            raise ConfigError(f"{path}: constraint {spec.expr!r} uses unknown option {name!r}")
    return Constraint(spec.expr, spec.why)


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_CMPOPS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
           ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        parent = _dotted(node.value)
        return f"{parent}.{node.attr}" if parent else None
    return None


def _names(node: ast.AST) -> list[str]:
    name = _dotted(node)
    if name is not None:
        return [name]
    return [n for child in ast.iter_child_nodes(node) for n in _names(child)]


def _evaluate(node: ast.AST, values: dict[str, Any]) -> Any:
    """A small, safe evaluator: arithmetic, comparisons, and/or/not over option values."""
    name = _dotted(node)
    if name is not None:
        return values[name]
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_evaluate(e, values) for e in node.elts]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _evaluate(node.operand, values)
    if isinstance(node, ast.BoolOp):
        results = (_evaluate(v, values) for v in node.values)
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, values)
        for op, right_node in zip(node.ops, node.comparators):
            right = _evaluate(right_node, values)
            if type(op) not in _CMPOPS or not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    raise ConfigError(f"unsupported expression element: {ast.dump(node)[:60]}")


def load_presets(path: str | Path) -> dict[str, dict[str, Any]]:
    """Named configurations (the seeds, a user's presets), dotted keys: the file's shape and every
    value are checked here, each value on its own (check_presets checks them against a space)."""
    from search.dedupe import REFERENCE_PRESET
    path = Path(path)
    raw = _read_yaml(path)
    if raw is None:
        raise ConfigError(f"{path}: no presets in the file; a preset is NAME: {{source: ..., config: {{...}}}}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of preset names to {{source: ..., config: {{...}}}}, "
                          f"got a {type(raw).__name__}")
    keys = cfg.known_keys()
    presets = {}
    for name, entry in raw.items():
        where = f"{path}: preset {name}"
        if str(name) == REFERENCE_PRESET:
            raise ConfigError(f"{where}: the name is the reference configuration's (every study's first "
                              "trial); give the preset another name")
        values = _validated(PresetEntry, entry, where, {(): PresetEntry}).config
        unknown = set(values) - set(keys)
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {sorted(unknown)}")
        try:  # each value as its option takes it; combinations are judged against a space
            cfg.build(values)
        except cfg.CombinationError:
            pass
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        check_tasks(where, values.get("workload.tasks") or [])
        presets[name] = dict(values)
    return presets


def check_presets(path: str | Path, presets: dict[str, dict[str, Any]], space: Space) -> None:
    """Each preset as a trial of `space` runs it (over the reference configuration, the space's fixed
    settings winning) builds a valid configuration: a preset that could only ever be an infeasible
    trial is refused before the study starts. Values outside the space's choices are not refused:
    the trial runs them as the preset has them (a seed's card outside a CPU space)."""
    reference = space.reference_config().flat()
    for name, values in presets.items():
        for label, config in (("", values), (", with the space's settings", {**reference, **values, **space.fixed})):
            try:
                cfg.build(config)
            except ConfigError as exc:
                raise ConfigError(f"{path}: preset {name}{label}: {exc}") from None
