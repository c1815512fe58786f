"""A real vLLM server (the serving environment's CPU build) started, queried and stopped."""

import os
import signal
import time

import httpx
import psutil
import pytest

from search import config as cfg
from search import workload
from search.serve import ServerFailed, ServerPool, port_in_use, start, vllm_config


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
    assert args["mm-processor-kwargs"] == {"max_soft_tokens": config.serve.image_soft_tokens}
    assert (args["quantization"], args["load-format"]) == ("bitsandbytes", "bitsandbytes")


def _alive(pids):
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_two_engine_configs_start_query_stop(serve_python, toy_model, tmp_path):
    """Each server is started from the vllm_config.yaml it writes, so vLLM accepting the file is checked too."""
    prompts = workload.load_prompts(cfg.WorkloadConfig(n_requests=2), tmp_path / "data")
    pool = ServerPool(serve_python)
    seen = []
    for i, (engine, prefix_caching) in enumerate([
            (_engine(max_num_seqs=4, kv_cache_dtype="auto"), True),
            (_engine(max_num_seqs=2, kv_cache_dtype="fp8", max_model_len=2048, enable_prefix_caching=False), False)]):
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


def test_failing_server_reports_its_reason(serve_python, toy_model, tmp_path):
    with pytest.raises(ServerFailed, match="max_model_len|max-model-len|position"):
        start(serve_python, toy_model, _engine(max_model_len=1_000_000), tmp_path, timeout_s=300)
