"""The search space: a YAML file a user edits, turned into Optuna suggestions and checked up front.

A space file has four sections (see spaces/default.yaml):
  fixed:        dotted option -> value, pinned for every trial (hardware-bound settings live here)
  params:       dotted option -> {choices: [...]} or {low, high[, step][, log]}, optional
                `when: {other.option: [values]}` makes it conditional
  constraints:  [{expr: "serve.max_num_seqs * serve.max_model_len <= 16384", why: "..."}]
  model / reference: which model, and the settings of the uncompressed baseline
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
from typing import TYPE_CHECKING, Any, Callable

import yaml

from search import config as cfg
from search.config import ConfigError, Infeasible  # noqa: F401  (Infeasible: re-exported)

if TYPE_CHECKING:  # Optuna is imported where a distribution is made: a space file is checked without it
    import optuna

_TOP_KEYS = {"model", "fixed", "params", "constraints", "reference", "description"}
_PARAM_KEYS = {"choices", "low", "high", "step", "log", "when"}


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

    def enqueue_params(self, preset: dict[str, Any]) -> dict[str, Any]:
        """A preset as Optuna can enqueue it: its values that lie inside this space's distributions,
        and for the params it does not name, the reference configuration's values. A seed changes
        what its card says and nothing else; the sampler does not fill its gaps at random."""
        reference = self.reference_config().flat()
        out = {}
        for param in self.params:
            value = preset[param.name] if param.name in preset else reference.get(param.name)
            if _contains(param.distribution(), value):
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
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; expected {sorted(_TOP_KEYS)}")
    if not raw.get("params"):
        raise ConfigError(f"{path}: no params to search; give at least one under `params:`")
    keys = cfg.known_keys()
    fixed = dict(raw.get("fixed") or {})
    params = tuple(_param(path, name, spec, keys) for name, spec in raw["params"].items())
    names = {p.name for p in params}
    both = names & set(fixed)
    if both:
        raise ConfigError(f"{path}: {sorted(both)} are both fixed and searched")
    for index, param in enumerate(params):
        _check_when(path, param, params[:index], names, fixed)
    constraints = tuple(_constraint(path, c, keys) for c in raw.get("constraints") or [])
    reference = dict(raw.get("reference") or {})
    space = Space(path, str(raw.get("model", "toy")), fixed, params, constraints, reference)
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


def _param(path: Path, name: str, spec: Any, keys: dict[str, Any]) -> Param:
    where = f"{path}: params.{name}"
    if name not in keys:
        raise ConfigError(f"{where}: unknown option; known options: {', '.join(sorted(keys))}")
    if not isinstance(spec, dict):
        spec = {"choices": spec} if isinstance(spec, list) else None
        if spec is None:
            raise ConfigError(f"{where}: expected {{choices: [...]}} or {{low: .., high: ..}}")
    unknown = set(spec) - _PARAM_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; expected {sorted(_PARAM_KEYS)}")
    when = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in (spec.get("when") or {}).items()}
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list")
        if {"low", "high", "step", "log"} & set(spec):
            raise ConfigError(f"{where}: give either choices or low/high, not both")
        return Param(name, choices=tuple(tuple(c) if isinstance(c, list) else c for c in choices), when=when)
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: a range needs both low and high")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise ConfigError(f"{where}: low and high must be numbers")
    if low >= high:
        raise ConfigError(f"{where}: inverted range, low ({low}) must be below high ({high})")
    if spec.get("log") and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0")
    return Param(name, low=low, high=high, step=spec.get("step"), log=bool(spec.get("log")), when=when)


def _constraint(path: Path, spec: Any, keys: dict[str, Any]) -> Constraint:
    if isinstance(spec, str):
        spec = {"expr": spec}
    if not isinstance(spec, dict) or "expr" not in spec or set(spec) - {"expr", "why"}:
        raise ConfigError(f"{path}: a constraint is {{expr: '...', why: '...'}}, got {spec!r}")
    try:
        tree = ast.parse(spec["expr"], mode="eval").body
    except SyntaxError:
        raise ConfigError(f"{path}: constraint {spec['expr']!r} is not a valid expression") from None
    for name in _names(tree):
        if name not in keys:
            raise ConfigError(f"{path}: constraint {spec['expr']!r} uses unknown option {name!r}")
    return Constraint(spec["expr"], spec.get("why", ""))


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


_PRESET_KEYS = {"source", "config"}


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
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected {{source: ..., config: {{...}}}}, got {entry!r}"[:300])
        unknown = set(entry) - _PRESET_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; expected {sorted(_PRESET_KEYS)}")
        if entry.get("config") is None:
            raise ConfigError(f"{where}: no config; give its options under `config:`")
        values = entry["config"]
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: config must be a mapping of dotted options to values, "
                              f"got a {type(values).__name__}")
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
