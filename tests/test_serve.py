"""A real vLLM server (the serving environment's CPU build) started, queried and stopped."""

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from search import config as cfg
from search import feasibility, workload
from search.config import Infeasible
from search.net import port_in_use
from search.serve import ServerFailed, ServerPool, engine_env, start, vllm_config

PROJECT = Path(__file__).resolve().parents[1]


def _engine(**serve):
    config = cfg.build({"serve.gpu_memory_utilization": 0.15, "serve.distributed_executor_backend": "uni",
                        **{f"serve.{k}": v for k, v in serve.items()}})
    return vllm_config(config.serve, config.compress)


def test_vllm_config_matches_engine_argument_names():
    config = cfg.build({"serve.kv_cache_dtype": "fp8_e4m3", "serve.max_num_batched_tokens": 4096,
                        "serve.enable_prefix_caching": False, "compress.scheme": "bnb_nf4"})
    args = vllm_config(config.serve, config.compress)
    assert args["kv-cache-dtype"] == "fp8_e4m3" and args["max-num-batched-tokens"] == 4096
    # vLLM 0.26 ignores `enable-prefix-caching: false` in a --config file; the --no- form works in every version.
    assert args["no-enable-prefix-caching"] is True and "enable-prefix-caching" not in args
    # Off unless asked for: the prefix cache and the multimodal processor cache.
    default = vllm_config(cfg.ServeConfig(), cfg.CompressionConfig())
    assert default["no-enable-prefix-caching"] is True and default["mm-processor-cache-gb"] == 0.0
    assert args["mm-processor-kwargs"] == {"max_soft_tokens": config.serve.image_soft_tokens}
    assert (args["quantization"], args["load-format"]) == ("bitsandbytes", "bitsandbytes")
    # vLLM's --skip-mm-profiling (a shorter start), written only when a study turns it on.
    assert _engine(skip_mm_profiling=True)["skip-mm-profiling"] is True
    assert not any("skip-mm-profiling" in key for key in default)


def test_cudagraph_capture_sizes_are_bounded_by_the_workload_and_the_compile_cache_lives_in_the_tools():
    gpu = {"serve.enforce_eager": False, "serve.max_num_batched_tokens": 8192}
    sizes = lambda args: args["compilation-config"]["cudagraph_capture_sizes"]  # noqa: E731
    # Up to the largest decode batch, min(max_num_seqs, concurrency), in vLLM's own steps.
    capped = cfg.build({**gpu, "serve.max_num_seqs": 128})
    assert sizes(vllm_config(capped.serve, capped.compress, 64)) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert sizes(vllm_config(capped.serve, capped.compress))[-1] == 128  # no workload given: max_num_seqs
    assert sizes(vllm_config(capped.serve, capped.compress, 100))[-2:] == [96, 100]
    # The sizes are in vLLM's compile-cache key: above the concurrency, max_num_seqs leaves them alone.
    wide = cfg.build({**gpu, "serve.max_num_seqs": 1024})
    assert vllm_config(wide.serve, wide.compress, 64)["compilation-config"] == \
        vllm_config(capped.serve, capped.compress, 64)["compilation-config"]
    assert sizes(vllm_config(wide.serve, wide.compress, 2048))[-1] == 512  # vLLM's largest default
    # "vllm" keeps vLLM's default sizes; eager mode captures nothing.
    for values in ({**gpu, "serve.cudagraph_capture": "vllm"}, {"serve.enforce_eager": True}):
        config = cfg.build(values)
        assert "compilation-config" not in vllm_config(config.serve, config.compress, 64)
    with pytest.raises(cfg.ConfigError):
        cfg.build({"serve.cudagraph_capture": "all"})
    with pytest.raises(cfg.ConfigError):
        cfg.ServeConfig(cudagraph_capture="all")


def test_a_memory_budget_is_vllm_s_share_of_this_gpu_and_fp8_marlin_an_environment_variable():
    budget = cfg.build({"serve.memory_budget_gib": 22})
    assert vllm_config(budget.serve, budget.compress, gpu_memory_gib=139.8)["gpu-memory-utilization"] == \
        round(22 / 139.8, 4)
    assert vllm_config(budget.serve, budget.compress, gpu_memory_gib=20.0)["gpu-memory-utilization"] == 1.0
    with pytest.raises(cfg.ConfigError, match="needs the GPU's memory size"):
        vllm_config(budget.serve, budget.compress)
    plain = cfg.build({"serve.gpu_memory_utilization": 0.5})
    assert vllm_config(plain.serve, plain.compress, gpu_memory_gib=139.8)["gpu-memory-utilization"] == 0.5
    with pytest.raises(cfg.ConfigError):
        cfg.build({"serve.memory_budget_gib": 0})
    assert engine_env(cfg.build({"serve.fp8_kernel": "marlin"}).serve) == {"VLLM_TEST_FORCE_FP8_MARLIN": "1"}
    assert engine_env(cfg.ServeConfig()) == {}


def test_checkpoints_with_one_config_json_are_served_from_one_path(tmp_path):
    from search.serve import compile_cache_env, model_path_lock, stable_model_path
    root = tmp_path / "cache" / "vllm"
    assert compile_cache_env(root) == {"VLLM_CACHE_ROOT": str(root), "TRITON_CACHE_DIR": str(root / "triton")}
    a, b, other = (tmp_path / name for name in ("gptq-a", "gptq-b", "fp8"))
    for path, text in ((a, '{"q": "w4a16"}'), (b, '{"q": "w4a16"}'), (other, '{"q": "fp8"}')):
        path.mkdir()
        (path / "config.json").write_text(text)
        (path / "weights").write_text(path.name)
    with model_path_lock(root, a):
        served_a = stable_model_path(a, root)
        assert (served_a / "weights").read_text() == "gptq-a"
    served_b = stable_model_path(b, root)
    assert served_b == served_a and (served_b / "weights").read_text() == "gptq-b"  # re-pointed
    assert stable_model_path(other, root) != served_a
    assert stable_model_path(tmp_path / "no-config", root) == tmp_path / "no-config"
    pool = ServerPool("python3", env={"VLLM_USE_FLASHINFER_SAMPLER": "0"}, compile_cache=root)
    assert pool.env == {**compile_cache_env(root), "VLLM_USE_FLASHINFER_SAMPLER": "0"}


def _alive(pids):
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def _kv_cache_reason(kv_cache_dtype, platform):
    try:
        feasibility.check(cfg.build({"serve.kv_cache_dtype": kv_cache_dtype}), platform)
    except Infeasible as exc:
        return str(exc)
    return None


def test_two_engine_configs_start_query_stop(serve_python, toy_model, tmp_path, platform):
    """Each server is started from the vllm_config.yaml it writes, so vLLM accepting the file is checked too.
    The second takes an FP8 KV cache where this CPU runs one, else the default KV cache (the refusal
    of FP8 on such a CPU is the next test's)."""
    prompts = workload.load_prompts(cfg.WorkloadConfig(n_requests=2), tmp_path / "data")
    pool = ServerPool(serve_python)
    seen = []
    second_kv = "fp8" if _kv_cache_reason("fp8", platform) is None else "auto"
    for i, (engine, prefix_caching) in enumerate([
            (_engine(max_num_seqs=4, kv_cache_dtype="auto", enable_prefix_caching=True), True),
            (_engine(max_num_seqs=2, kv_cache_dtype=second_kv, max_model_len=2048, enable_prefix_caching=False),
             False)]):
        server, reused = pool.get(toy_model, engine, tmp_path / f"s{i}")
        assert not reused
        assert (tmp_path / f"s{i}" / "vllm_config.yaml").exists()
        # The engine ran with what the file says, false flags included.
        assert f"enable_prefix_caching={prefix_caching}" in server.log_path.read_text()
        assert "127.0.0.1" in server.base_url
        results = workload.run(server.base_url, server.served_name, prompts, cfg.WorkloadConfig(max_tokens=4))
        assert [r.error for r in results] == [None, None]
        assert all(r.completion_tokens > 0 and r.ttft_s is not None for r in results)
        assert server.metrics()["vllm:generation_tokens_total"] >= 8
        again, reused = pool.get(toy_model, engine, tmp_path / "unused")
        assert reused and again is server
        seen.append((server.port, server.pids()))
    pool.close()
    for port, pids in seen:
        assert not port_in_use(port)
        assert _alive(pids) == []


def test_fp8_kv_cache_is_refused_by_vllm_exactly_where_feasibility_says(serve_python, toy_model, tmp_path,
                                                                         platform, avx2_env):
    """On an AVX2-only CPU as vLLM's CPU backend sees one, and on this CPU where it is one (where this
    CPU runs FP8 KV, the test above served it)."""
    avx2 = dataclasses.replace(platform, cpu=feasibility.probe_cpu_build(serve_python, "0.32.0", None, avx2_env))
    assert _kv_cache_reason("fp8", avx2) == (
        "an FP8 KV cache needs AVX-512 or AMX on a CPU; this CPU has AVX2, no AVX-512 or AMX")
    cases = [("avx2", {"PYTHONPATH": avx2_env["PYTHONPATH"]})]
    if _kv_cache_reason("fp8", platform) is not None:
        cases.append(("this-cpu", None))
    for name, env in cases:
        with pytest.raises(ServerFailed, match="FP8 KV cache on CPU requires x86 with AVX-512 or AMX"):
            start(serve_python, toy_model, _engine(kv_cache_dtype="fp8"), tmp_path / name, env=env)


def test_server_killed_mid_workload_fails_cleanly(serve_python, toy_model, tmp_path):
    server = start(serve_python, toy_model, _engine(), tmp_path)
    prompts = workload.load_prompts(cfg.WorkloadConfig(n_requests=4), tmp_path / "data")
    pids = server.pids()
    engine_pid = pids[-1]
    import threading
    killer = threading.Timer(0.5, lambda: os.kill(engine_pid, signal.SIGKILL))
    killer.start()
    results = workload.run(server.base_url, server.served_name, prompts,
                           cfg.WorkloadConfig(max_tokens=512, ignore_eos=True, concurrency=1), timeout_s=60)
    assert any(r.error for r in results)
    server.stop()
    assert _alive(pids) == []
    assert not port_in_use(server.port)


OWNER = """
import json, sys, time
from pathlib import Path
from search.serve import launch
server = launch(sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4]))
print(server.process.pid, flush=True)
time.sleep(600)
"""


def test_a_server_never_outlives_its_owner(serve_python, main_python, toy_model, tmp_path):
    """A study killed with SIGKILL cannot stop its server (a session of its own): the server's
    lifeline, the leader of that session, does."""
    owner = subprocess.Popen([main_python, "-c", OWNER, serve_python, str(toy_model), json.dumps(_engine()),
                              str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=PROJECT)
    lifeline = psutil.Process(int(owner.stdout.readline()))
    deadline = time.monotonic() + 30
    while not lifeline.children() and time.monotonic() < deadline:
        time.sleep(0.1)
    group = [lifeline, *lifeline.children(recursive=True)]
    assert len(group) >= 2  # the lifeline and vLLM's API server
    owner.kill()
    owner.wait()
    _, alive = psutil.wait_procs(group, timeout=15)
    assert alive == []


def test_failing_server_reports_its_reason(serve_python, toy_model, tmp_path):
    with pytest.raises(ServerFailed, match="max_model_len|max-model-len|position"):
        start(serve_python, toy_model, _engine(max_model_len=1_000_000), tmp_path, timeout_s=300)
