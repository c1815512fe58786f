"""Issue 20 item 1: where a vLLM server start goes on the GPU, and what the compile cache saves.

Runs on the GPU machine (bench/gpu/stage_and_run.sh startbench starts it, after the twin's build and
every wheel part), through the product's own code: search.serve.vllm_config of the GPU space's
reference configuration, search.serve.start / ServerPool. Each start's log is parsed into phases
from vLLM's own timing lines (`breakdown`), and the whole log is kept.

  drive      the cases below in order, then (optionally) `python -m search run` on the twin with
             bench/gpu/space-server-start.yaml: trials whose servers restart on a compile-cache hit.
  breakdown  LOG... (here, no GPU): the phases of saved server logs, as a table.

Cases (the twin served in bf16 with the GPU space's reference settings each time):
  before      the product as of 2026-11-26: vLLM's default CUDA-graph sizes, a fresh VLLM_CACHE_ROOT
              (a fresh machine: nothing compiled yet), the checkpoint's own path;
  cold        the product now: sizes bounded by the workload (min(max_num_seqs, concurrency)), the
              compile cache under the tool's cache dir, the checkpoint from its stable path; cold;
  hit         the same again: the compiled model, the Triton kernels and the model info come from
              the cache;
  hit_copy    another checkpoint folder with the same config.json (hard links of the twin): served
              from the same stable path, so it hits too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# vLLM's own timing lines: name -> regex with the seconds in group "s".
STATED = {
    "weights_s": r"Model loading took [\d.]+ GiB and (?P<s>[\d.]+) seconds",
    "dynamo_s": r"Dynamo bytecode transform time: (?P<s>[\d.]+) s",
    "inductor_s": r"Compiling a graph for compile range .* takes (?P<s>[\d.]+) s",
    "load_compiled_s": r"Directly load the compiled graph\(s\) for compile range .* took (?P<s>[\d.]+) s",
    "compile_total_s": r"torch\.compile took (?P<s>[\d.]+) s in total",
    "profile_run_s": r"Initial profiling/warmup run took (?P<s>[\d.]+) s",
    "graphs_s": r"Graph capturing finished in (?P<s>[\d.]+) secs",
    "init_engine_s": r"init engine \(profile, create kv cache, warmup model\) took (?P<s>[\d.]+) s",
    "mm_warmup_s": r"Multi-modal warmup completed in (?P<s>[\d.]+)s",
}
# Moments: name -> regex of the first line that marks it.
MOMENTS = {
    "first_line": r"^\(APIServer pid=\d+\) (INFO|DEBUG|WARNING)",
    "arch_resolved": r"Resolved architecture",
    "engine_init": r"Initializing a V1 LLM engine",
    "load_done": r"Model loading took",
    "aot_loaded": r"Directly load AOT compilation from path",
    "compile_done": r"torch\.compile took|Directly load the compiled graph\(s\)",
    "kv_done": r"GPU KV cache size",
    "graphs_done": r"Graph capturing finished",
    "init_done": r"init engine \(profile, create kv cache, warmup model\) took",
    "server_starting": r"Starting vLLM server on",
    "app_ready": r"Application startup complete",
}
_STAMP = re.compile(r"(?:INFO|DEBUG|WARNING|ERROR) (\d\d)-(\d\d) (\d\d):(\d\d):(\d\d) ")


def breakdown(log_path: Path, launched: float | None = None, started_s: float | None = None) -> dict:
    """Phases of one server start: vLLM's stated timings, and the moments (seconds after the launch,
    or after the first log line without `launched`) the log marks, at the log's 1 s resolution."""
    text = log_path.read_text(errors="replace")
    out: dict = {}
    for name, pattern in STATED.items():
        values = [float(m.group("s")) for m in re.finditer(pattern, text)]
        if values:
            out[name] = round(sum(values), 2)
    year = dt.datetime.now().year
    base = launched
    moments: dict[str, float] = {}
    for line in text.splitlines():
        stamp = _STAMP.search(line)
        if not stamp:
            continue
        mo, day, h, mi, sec = (int(g) for g in stamp.groups())
        t = dt.datetime(year, mo, day, h, mi, sec).timestamp()
        if base is None:
            base = t
        for name, pattern in MOMENTS.items():
            if name not in moments and re.search(pattern, line):
                moments[name] = round(t - base, 1)
    out["moments"] = moments
    m = moments
    phase = lambda a, b: round(m[b] - m[a], 1) if a in m and b in m else None  # noqa: E731
    compiled = "compile_done" if "compile_done" in m else "aot_loaded"
    out["phases"] = {
        "python_start_to_first_log": m.get("first_line") if launched is not None else None,
        "api_config_and_model_inspection": phase("first_line", "arch_resolved"),
        "api_to_engine_core": phase("arch_resolved", "engine_init"),
        "engine_init_and_weights": phase("engine_init", "load_done"),
        "torch_compile_or_cache_load": phase("load_done", compiled),
        "profile_kv_graphs_warmup": phase(compiled, "init_done"),
        "api_after_engine (mm warmup)": phase("init_done", "server_starting"),
        "to_healthy": round(started_s - m["server_starting"], 1)
        if started_s is not None and "server_starting" in m and launched is not None else None,
    }
    if started_s is not None:
        out["started_s"] = round(started_s, 1)
    return out


# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[start {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed_python(python: str, code: str, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, env={**os.environ, **(env or {})})
    return {"wall_s": round(time.perf_counter() - t0, 2), "rc": r.returncode,
            "stdout": r.stdout[-800:], "stderr": r.stderr[-800:] if r.returncode else ""}


def drive(args) -> None:
    from search import space as space_mod
    from search import serve
    from search.config import CompressionConfig

    out = Path(args.out)
    (out / "server-logs").mkdir(parents=True, exist_ok=True)
    rows = out / "results.jsonl"

    def record(row: dict) -> None:
        row["utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        with open(rows, "a") as f:
            f.write(json.dumps(row) + "\n")

    root = Path(args.root)
    base = root / "base"
    for flag in (Path(args.wait_for), base / "BUILD_OK"):
        t0 = time.time()
        while not flag.exists():
            if time.time() - t0 > 900:
                raise SystemExit(f"{flag} never appeared")
            time.sleep(2)
    log("wheels and twin are there")

    env_info = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "nproc": os.cpu_count(),
                "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE")}
    env_info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm,temperature.gpu",
         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    versions = timed_python(args.serve_python, "import importlib.metadata as m\nfor p in ('vllm','torch','transformers',"
                            "'triton','flashinfer-python','compressed-tensors'):\n    print(p, m.version(p))")
    env_info["serve_versions"] = versions["stdout"]
    (out / "env.json").write_text(json.dumps(env_info, indent=1))

    # 1. Python's own start: vLLM's API server module, without and with byte-code on disk.
    imp = "import time; t = time.perf_counter(); import vllm.entrypoints.openai.api_server; print(time.perf_counter() - t)"
    pyc_before = len(list(Path(args.site_vllm, "vllm").glob("__pycache__/*.pyc")))
    record({"case": "import_api_server", "pyc_files_in_vllm_top": pyc_before, **timed_python(args.serve_python, imp)})
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", args.site_vllm],
                       capture_output=True, text=True)
    record({"case": "compileall_site_vllm", "wall_s": round(time.perf_counter() - t0, 1), "rc": r.returncode})
    record({"case": "import_api_server_after_compileall", **timed_python(args.serve_python, imp)})
    record({"case": "import_api_server_again", **timed_python(args.serve_python, imp)})
    tok = ("import time; t = time.perf_counter(); from transformers import AutoTokenizer, AutoProcessor; "
           f"AutoTokenizer.from_pretrained('{base}'); a = time.perf_counter(); AutoProcessor.from_pretrained('{base}'); "
           "print('tokenizer', round(a - t, 2), 'processor', round(time.perf_counter() - a, 2))")
    record({"case": "twin_tokenizer_and_processor_load", **timed_python(args.serve_python, tok)})
    log("python start measured")

    # 2. Server starts.
    ref = space_mod.load(REPO / "spaces/gemma4-e4b-gpu.yaml").reference_config()
    concurrency = ref.workload.max_in_flight  # what search/trial.py bounds the graphs by
    # The product's server environment (search/cli.py), plus the log level (not in vLLM's cache key).
    env = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_LOGGING_LEVEL": args.log_level}
    cache = Path(args.compile_cache)
    copy = root / "base-copy"
    if not copy.exists():
        subprocess.run(["cp", "-al", str(base), str(copy)], check=True)
    before_root = Path("/tmp/vc-before")
    shutil.rmtree(before_root, ignore_errors=True)
    cases = []
    if "before" in args.cases:
        engine = serve.vllm_config(ref.serve.model_copy(update={"cudagraph_capture": "vllm"}), CompressionConfig())
        cases.append(("before", base, engine, None))
    engine = serve.vllm_config(ref.serve, CompressionConfig(), concurrency)
    for name, model in (("cold", base), ("hit", base), ("hit_copy", copy)):
        if name in args.cases:
            cases.append((name, model, engine, cache))
    for name, model, engine, compile_cache in cases:
        workdir = root / f"start-{name}"
        shutil.rmtree(workdir, ignore_errors=True)
        row = {"case": name, "model": str(model), "engine": engine,
               "compile_cache": str(compile_cache) if compile_cache else str(before_root)}
        launched = time.time()
        server = None
        try:
            if compile_cache is None:
                server = serve.start(args.serve_python, model, engine, workdir, timeout_s=args.start_timeout,
                                     env={**env, **serve.compile_cache_env(before_root)})
            else:
                pool = serve.ServerPool(args.serve_python, env=env, ready_timeout_s=args.start_timeout,
                                        compile_cache=compile_cache)
                server, _ = pool.get(model, engine, workdir)
            row["served_path"] = str(server.model)
            row.update(breakdown(server.log_path, launched, server.started_s))
            log(f"{name}: ready in {server.started_s:.1f} s")
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            log(f"{name}: FAILED {row['error']}")
            traceback.print_exc()
        finally:
            t0 = time.perf_counter()
            if server is not None:
                server.stop()
            row["stop_s"] = round(time.perf_counter() - t0, 1)
            if (workdir / "server.log").exists():
                shutil.copy(workdir / "server.log", out / "server-logs" / f"{name}.log")
            record(row)
    listing = subprocess.run(["du", "-sh", *[str(p) for p in sorted(cache.glob("*"))]], capture_output=True, text=True)
    record({"case": "compile_cache_contents", "du": listing.stdout})

    # 3. The product on the twin: trials that restart their server on a compile-cache hit.
    if args.product_trials:
        cmd = [sys.executable, "-m", "search", "run", "--trials", str(args.product_trials), "--model", str(base),
               "--space", str(REPO / "bench/gpu/space-server-start.yaml"), "--home", args.product_home,
               "--serve-python", args.serve_python, "--compress-python", args.compress_python,
               "--sampler", "random", "--gate", "0", "--trial-timeout", "600"]
        log("product: " + " ".join(cmd))
        t0 = time.perf_counter()
        with open(out / "product.log", "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        record({"case": "product_run", "cmd": cmd, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1)})
    log("FINAL")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drive")
    d.add_argument("--root", default="/tmp/bench")
    d.add_argument("--out", default="/tmp/bench-out")
    d.add_argument("--wait-for", default="/tmp/stage/vllm.ok")
    d.add_argument("--serve-python", default="/tmp/py-serve")
    d.add_argument("--compress-python", default="/tmp/py-compress")
    d.add_argument("--site-vllm", default="/tmp/site-vllm")
    d.add_argument("--compile-cache", default="/tmp/product/cache/vllm",
                   help="the product's (--home /tmp/product): its baseline start is then a hit")
    d.add_argument("--product-home", default="/tmp/product")
    d.add_argument("--product-trials", type=int, default=0)
    d.add_argument("--cases", default="before,cold,hit,hit_copy")
    d.add_argument("--log-level", default="DEBUG")
    d.add_argument("--start-timeout", type=float, default=600)
    b = sub.add_parser("breakdown")
    b.add_argument("logs", nargs="+", type=Path)
    args = p.parse_args()
    if args.cmd == "drive":
        drive(args)
    else:
        for path in args.logs:
            print(path, json.dumps(breakdown(path), indent=1))


if __name__ == "__main__":
    main()
