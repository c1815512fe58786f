"""Pareto-front export and the study's figures.

`pareto_front` is plain maths over (energy, recovery) points; `export` writes the front as CSV and
JSON plus, for each point, a folder with its vllm_config.yaml, recipe.yaml and the commands that
rebuild and serve it.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from search.config import ConfigError, TrialConfig, flatten
from search.summaries import measured


@dataclass(frozen=True)
class Point:
    trial: int
    energy: float  # minimised
    recovery: float  # maximised
    feasible: bool


def dominates(a: Point, b: Point) -> bool:
    return (a.energy <= b.energy and a.recovery >= b.recovery) and (a.energy < b.energy or a.recovery > b.recovery)


def pareto_front(points: list[Point]) -> list[Point]:
    """Non-dominated points: the feasible front first (by energy), then the infeasible front."""
    def front(group: list[Point]) -> list[Point]:
        return sorted((p for p in group if not any(dominates(q, p) for q in group)), key=lambda p: p.energy)
    return front([p for p in points if p.feasible]) + front([p for p in points if not p.feasible])


def points(study: optuna.Study) -> list[Point]:
    out = []
    for t in measured(study):
        metrics = t.user_attrs.get("metrics", {})
        out.append(Point(t.number, t.values[0], metrics.get("recovery_mean", 0.0), bool(t.user_attrs.get("feasible"))))
    return out


def _rebuild_command(trial: optuna.trial.FrozenTrial, study: optuna.Study) -> str:
    config = trial.user_attrs.get("config", {})
    sets = " ".join(f"--set {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in sorted(config.items())
                    if k.startswith("compress."))
    return f"python -m search compress --model {shlex.quote(study.user_attrs.get('model', 'MODEL'))} {sets} --out CHECKPOINT"


# vLLM's start-up line giving the KV cache it sized (gpu_worker.py), in the trial's server log.
_KV_CACHE_LINE = re.compile(r"Available KV cache memory: ([0-9.]+) GiB")


def kv_cache_bytes(server_log: Path) -> int | None:
    """The KV cache the trial's server had, from its log (the last start's), or None."""
    if not server_log.exists():
        return None
    found = _KV_CACHE_LINE.findall(server_log.read_text(errors="replace"))
    return int(float(found[-1]) * 2**30) if found else None


def deployable(engine: dict[str, Any], config: dict[str, Any], chat_template: Path | None,
               kv_cache: int | None = None) -> dict[str, Any]:
    """A trial's engine arguments plus its request-level settings as the server's defaults, so that a
    request naming only its messages is answered as the trial's were: the verbosity's system turn
    (a chat template that adds it), thinking (default chat-template kwargs), max_tokens and the
    decoding policy (vLLM's generation-config override). Per-request seeds are not deployable.

    Under serve.memory_budget_gib the trial's gpu-memory-utilization is the budget's share of the
    card it ran on (0.25 of an 80 GiB H100 for 20 GiB), which on the card it is meant for (an L4)
    would leave vLLM a few GiB: the KV cache the trial had (`kv_cache`, bytes) is written instead,
    which means the same capacity on any card that holds the model and it."""
    config = {**flatten(TrialConfig()), **config}  # a record may hold only the options it set
    if config.get("serve.memory_budget_gib") and kv_cache:
        engine = {k: v for k, v in engine.items() if k != "gpu-memory-utilization"}
        engine["kv-cache-memory-bytes"] = kv_cache
    sampling = {"temperature": 0.0} if config["workload.decoding"] == "greedy" else {
        "temperature": config["workload.temperature"], "top_p": config["workload.top_p"],
        "top_k": config["workload.top_k"]}
    out = {**engine, "override-generation-config": {**sampling, "max_new_tokens": config["workload.max_tokens"]},
           "default-chat-template-kwargs": {"enable_thinking": config["workload.thinking"]}}
    if chat_template is not None:
        out["chat-template"] = str(chat_template)
    return out


def export(study: optuna.Study, out_dir: Path, numbers: list[int] | None = None) -> list[dict[str, Any]]:
    """The Pareto front, or the measured trials `numbers` in that order, as CSV/JSON and deployables."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    chosen = pareto_front(points(study))
    if numbers is not None:
        by_trial = {p.trial: p for p in points(study)}
        missing = [n for n in numbers if n not in by_trial]
        if missing:
            raise ConfigError(f"study {study.study_name!r} has no measured trial {missing[0]} "
                              f"(measured: {sorted(by_trial)})")
        chosen = [by_trial[n] for n in numbers]
    rows = []
    for rank, point in enumerate(chosen):
        t = trials[point.trial]
        row = {"rank": rank, "trial": t.number, "feasible": point.feasible, "energy_j_per_request": point.energy,
               "recovery_mean": point.recovery, "energy_source": t.user_attrs.get("energy_source"),
               "job": study.user_attrs.get("job"),
               **{f"param.{k}": v for k, v in t.user_attrs.get("config", {}).items()},
               **{f"metric.{k}": v for k, v in t.user_attrs.get("metrics", {}).items()}}
        rows.append(row)
        folder = out_dir / f"trial-{t.number:04d}"
        folder.mkdir(exist_ok=True)
        workdir = Path(t.user_attrs.get("workdir", ""))
        for name in ("recipe.yaml", "chat_template.jinja"):
            if (workdir / name).exists():
                shutil.copy2(workdir / name, folder / name)
        kv_cache = kv_cache_bytes(workdir / "server.log")
        if (workdir / "vllm_config.yaml").exists():
            template = folder / "chat_template.jinja"
            engine = deployable(yaml.safe_load((workdir / "vllm_config.yaml").read_text()),
                                t.user_attrs.get("config", {}), template.resolve() if template.exists() else None,
                                kv_cache)
            (folder / "vllm_config.yaml").write_text(yaml.safe_dump(engine, sort_keys=False))
        budget = t.user_attrs.get("config", {}).get("serve.memory_budget_gib")
        measured_on = f"measured on {t.user_attrs.get('gpu') or 'an unrecorded device'}" + (
            f" under a {budget:g} GiB memory budget" + (
                f"; vllm_config.yaml pins the KV cache it had, {kv_cache / 2**30:.2f} GiB (kv-cache-memory-bytes), "
                "so the same capacity on the card it is meant for" if kv_cache else
                "; its server log gives no KV-cache size: set gpu-memory-utilization for your card") if budget else "")
        (folder / "README.md").write_text(
            f"# Trial {t.number} ({'feasible' if point.feasible else 'infeasible'})\n\n"
            f"energy {point.energy:.6g} J/request ({row['energy_source']}; the {row['job']}), "
            f"mean recovery {point.recovery:.4f}, {measured_on}\n\n"
            "Rebuild the checkpoint (recipe.yaml holds the exact llmcompressor recipe):\n\n"
            f"    {_rebuild_command(t, study)}\n\n"
            "Serve it as the trial did (its system turn, thinking, max_tokens and sampling are the server's "
            "defaults; a request's own values win):\n\n    vllm serve CHECKPOINT --config vllm_config.yaml\n")
    columns = sorted({k for row in rows for k in row}, key=lambda k: (k.count("."), k))
    with open(out_dir / "pareto.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    (out_dir / "pareto.json").write_text(json.dumps(rows, indent=2, default=str))
    return rows


def figures(study: optuna.Study, out_dir: Path) -> dict[str, Path]:
    """The study's figures: search/figures.py (units, the gate, the importances' evaluator)."""
    from search.figures import figures as make
    return make(study, out_dir)
