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
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from search import config as cfg
from search.config import ConfigError, Infeasible  # noqa: F401  (Infeasible: re-exported)

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
        return trial._suggest(self.name, self.distribution())


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
        """This space with `values` fixed for every trial; a pinned param is no longer searched."""
        return Space(self.path, self.model, {**self.fixed, **values},
                     tuple(p for p in self.params if p.name not in values), self.constraints, self.reference)

    def check(self, trial_config: cfg.TrialConfig) -> None:
        flat = trial_config.flat()
        for constraint in self.constraints:
            if not constraint.holds(flat):
                raise Infeasible(f"constraint {constraint.expr!r} does not hold" +
                                 (f" ({constraint.why})" if constraint.why else ""))

    def reference_config(self) -> cfg.TrialConfig:
        """The uncompressed baseline: fixed settings, then the reference section."""
        return cfg.build({**self.fixed, **self.reference, "compress.scheme": "none"})

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
    try:
        return dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


def load(path: str | Path) -> Space:
    """Parse and check a space file; every problem is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; expected {sorted(_TOP_KEYS)}")
    keys = cfg.known_keys()
    fixed = dict(raw.get("fixed") or {})
    params = tuple(_param(path, name, spec, keys) for name, spec in (raw.get("params") or {}).items())
    names = {p.name for p in params}
    both = names & set(fixed)
    if both:
        raise ConfigError(f"{path}: {sorted(both)} are both fixed and searched")
    for param in params:
        for key in param.when:
            if key not in names and key not in fixed:
                raise ConfigError(f"{path}: params.{param.name}.when refers to {key!r}, which is neither a param nor fixed")
    constraints = tuple(_constraint(path, c, keys) for c in raw.get("constraints") or [])
    reference = dict(raw.get("reference") or {})
    space = Space(path, str(raw.get("model", "toy")), fixed, params, constraints, reference)
    # Every fixed value and every choice must build a valid config on its own.
    cfg.build(fixed)
    cfg.build({**fixed, **reference})
    for param in params:
        for choice in param.choices or (param.low, param.high):
            try:
                cfg.coerce(param.name, keys[param.name], choice)
            except ConfigError as exc:
                raise ConfigError(f"{path}: params.{param.name}: {exc}") from None
    return space


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


def load_presets(path: str | Path) -> dict[str, dict[str, Any]]:
    """Named configurations (the seeds and the bf16 reference), dotted keys, checked against the config."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    keys = cfg.known_keys()
    presets = {}
    for name, entry in raw.items():
        values = dict(entry.get("config") or {})
        unknown = set(values) - set(keys)
        if unknown:
            raise ConfigError(f"{path}: preset {name}: unknown option(s) {sorted(unknown)}")
        presets[name] = values
    return presets
