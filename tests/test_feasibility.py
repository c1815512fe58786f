"""What this machine and serving build can run: the rules against both CPU kinds' probe results,
the probe itself (on this CPU, and on an AVX2-only CPU as vLLM's CPU backend sees one), and the
reason a dead engine leaves in its log."""

import dataclasses
from pathlib import Path

import optuna
import pytest

from search import cli
from search import config as cfg
from search import feasibility, space
from search import study as study_mod
from search.config import Infeasible
from search.serve import failure_reason, logged_exception

PROJECT = Path(__file__).resolve().parents[1]
LOGS = PROJECT / "tests" / "data" / "vllm_logs"

# The kernels vLLM 0.32's CPU libraries register, as far as these rules look at them.
AVX512_AMX = feasibility.CpuBuild("AVX512", True, True, "_C",
                                  frozenset({"cpu_gemm_wna16", "onednn_scaled_mm", "int8_scaled_mm_with_quant"}))
AVX2 = feasibility.CpuBuild("AVX2", False, False, "_C_AVX2", frozenset({"onednn_scaled_mm"}))


def cpu_platform(build):
    return feasibility.Platform("cpu", None, None, "0.32.0", "0.14.0.1", "cpu", "0.1.0", build)


def reason(values, build):
    try:
        feasibility.check(cfg.build(values), cpu_platform(build))
    except Infeasible as exc:
        return str(exc)
    return None


def test_fp8_kv_cache_needs_avx512_or_amx():
    fp8_kv = {"serve.kv_cache_dtype": "fp8"}
    assert reason(fp8_kv, AVX512_AMX) is None
    assert reason(fp8_kv, dataclasses.replace(AVX512_AMX, amx=False)) is None
    assert reason(fp8_kv, AVX2) == "an FP8 KV cache needs AVX-512 or AMX on a CPU; this CPU has AVX2, no AVX-512 or AMX"
    assert reason({"serve.kv_cache_dtype": "auto"}, AVX2) is None


def test_quantized_schemes_need_their_kernel_in_the_loaded_library():
    w4a16 = {"compress.scheme": "w4a16", "compress.method": "gptq"}
    assert reason(w4a16, AVX512_AMX) is None
    assert "cpu_gemm_wna16" in reason(w4a16, AVX2) and "_C_AVX2" in reason(w4a16, AVX2)
    # Pruning does not change what the quantized layers call.
    assert "cpu_gemm_wna16" in reason({**w4a16, "compress.prune.method": "sparsegpt", "compress.prune.base": 0.1}, AVX2)
    assert reason({"compress.scheme": "w8a8"}, AVX2) is None
    assert reason({"compress.scheme": "fp8_dynamic"}, AVX2) is None
    # No CPU library implements static FP8 activation quantization.
    assert "static_scaled_fp8_quant" in reason({"compress.scheme": "fp8"}, AVX512_AMX)


def test_gpu_rules_ignore_the_cpu_probe():
    hopper = feasibility.Platform("cuda", "NVIDIA H200", (9, 0), "0.26.0", "0.14.0.1", "cuda", "0.1.0")
    feasibility.check(cfg.build({"compress.scheme": "w4a16", "serve.kv_cache_dtype": "fp8"}), hopper)
    ampere = dataclasses.replace(hopper, capability=(8, 0))
    with pytest.raises(Infeasible, match="FP8 KV cache needs compute capability >= 8.9"):
        feasibility.check(cfg.build({"serve.kv_cache_dtype": "fp8"}), ampere)


def test_the_default_space_names_what_an_avx2_cpu_cannot_run_and_keeps_the_rest():
    default = space.load(PROJECT / "spaces" / "default.yaml")
    assert default.unavailable_choices(lambda c: feasibility.check(c, cpu_platform(AVX512_AMX))) == []
    unavailable = default.unavailable_choices(lambda c: feasibility.check(c, cpu_platform(AVX2)))
    assert [(name, choice) for name, choice, _ in unavailable] == [
        ("compress.scheme", "w4a16"), ("serve.kv_cache_dtype", "fp8")]
    runnable = {p.name: p.choices for p in default.without(unavailable).params}
    assert runnable["compress.scheme"] == ("none", "fp8_dynamic", "w8a8")
    assert runnable["serve.kv_cache_dtype"] == ("auto",)
    assert runnable["workload.verbosity"] == ("model", "concise", "terse")  # untouched


def test_a_param_with_no_runnable_choice_is_refused(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("params:\n  serve.kv_cache_dtype: {choices: [fp8, fp8_e4m3]}\n")
    loaded = space.load(path)
    unavailable = loaded.unavailable_choices(lambda c: feasibility.check(c, cpu_platform(AVX2)))
    with pytest.raises(cfg.ConfigError, match="no choice of serve.kv_cache_dtype can run here"):
        loaded.without(unavailable)


def test_probe_of_this_machine_agrees_with_vllm_kernel_choice(platform):
    """The probe runs vLLM's own kernel import: the library it names is the one vLLM picks here."""
    assert platform.device == "cpu" and platform.cpu is not None
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert platform.cpu.avx512 == ("avx512f" in flags)
    assert platform.cpu.amx == ("amx_tile" in flags)
    assert platform.cpu.kernel_library == ("_C_AVX2" if "avx512f" not in flags else
                                           "_C" if "avx512_bf16" in flags else "_C_AVX512")
    assert "onednn_scaled_mm" in platform.cpu.kernels


def test_probe_on_an_avx2_cpu_finds_no_4bit_kernel(serve_python, avx2_env):
    found = feasibility.probe_cpu_build(serve_python, "0.32.0", None, avx2_env)
    assert (found.isa, found.avx512, found.amx, found.kernel_library) == ("AVX2", False, False, "_C_AVX2")
    assert "cpu_gemm_wna16" not in found.kernels and "onednn_scaled_mm" in found.kernels


def test_cpu_probe_is_cached_per_environment_and_cpu(serve_python, tmp_path):
    first = feasibility.probe_cpu_build(serve_python, "0.32.0", tmp_path)
    cached = list(tmp_path.glob("cpu-build-*.json"))
    assert len(cached) == 1
    assert feasibility.probe_cpu_build(serve_python, "0.32.0", tmp_path) == first
    feasibility.probe_cpu_build(serve_python, "another-version", tmp_path)
    assert len(list(tmp_path.glob("cpu-build-*.json"))) == 2


# --- the reason recorded for a dead engine -----------------------------------------------------

def test_reason_is_the_engine_exception_not_the_wrapper():
    assert failure_reason(LOGS / "fp8_kv_on_avx2.log") == (
        "NotImplementedError: FP8 KV cache on CPU requires x86 with AVX-512 or AMX.")


def test_reason_of_a_request_time_death_is_the_engine_error():
    assert failure_reason(LOGS / "w4a16_request_on_avx2.log") == (
        "AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'")


def test_pydantic_reason_keeps_its_next_line():
    assert "max_model_len (1000000) is greater than" in failure_reason(LOGS / "max_model_len_too_long.log")


def test_a_warning_that_mentions_an_error_is_never_the_reason(tmp_path):
    log = tmp_path / "server.log"
    warning = ("(EngineCore pid=7) WARNING 12-01 22:29:45 [cpu.py:90] Failed to create oneDNN linear, "
               "fallback to torch linear, error: RuntimeError: unsupported\n")
    log.write_text(warning + (LOGS / "fp8_kv_on_avx2.log").read_text())
    assert failure_reason(log).startswith("NotImplementedError: FP8 KV cache")
    log.write_text(warning + "(APIServer pid=6) INFO 12-01 22:29:46 [api_server.py:1] shutting down\n")
    assert logged_exception(log) is None
    assert "oneDNN" not in failure_reason(log)


def test_a_traceback_before_ready_is_not_an_engine_death_after_it():
    log = LOGS / "w4a16_request_on_avx2.log"
    assert logged_exception(log, since=log.stat().st_size) is None


def test_a_memory_budget_needs_a_gpu_that_has_that_much():
    budget = {"serve.memory_budget_gib": 22}
    assert "caps GPU memory and this machine has no GPU" in reason(budget, AVX512_AMX)
    h200 = feasibility.Platform("cuda", "NVIDIA H200", (9, 0), "0.26.0", "0.14.0.1", "cuda", None,
                                gpu_memory_gib=139.8)
    feasibility.check(cfg.build(budget), h200)
    l4 = dataclasses.replace(h200, gpu_name="NVIDIA L4", capability=(8, 9), gpu_memory_gib=22.5)
    with pytest.raises(Infeasible, match="22 GiB is more than this GPU's 22.5 GiB|more than this GPU"):
        feasibility.check(cfg.build({"serve.memory_budget_gib": 23}), l4)


def test_the_l4_space_runs_within_an_l4_s_memory_on_any_gpu_and_is_refused_on_a_cpu():
    l4_space = space.load(PROJECT / "spaces" / "gemma4-e4b-l4.yaml")
    reference = l4_space.reference_config()
    assert reference.serve.memory_budget_gib == 20
    with pytest.raises(Infeasible, match="no GPU"):
        feasibility.check(reference, cpu_platform(AVX512_AMX))
    for gpu, memory in (("NVIDIA L4", 22.5), ("NVIDIA H200", 139.8)):
        feasibility.check(reference, feasibility.Platform("cuda", gpu, (8, 9), "0.26.0", "0.14.0.1", "cuda", None,
                                                          gpu_memory_gib=memory))
    assert "nvfp4a16" not in next(p for p in l4_space.params if p.name == "compress.scheme").choices


def test_an_fp8_e5m2_kv_cache_cannot_start_under_triton_attention_on_a_gpu():
    hopper = feasibility.Platform("cuda", "NVIDIA H100 80GB HBM3", (9, 0), "0.26.0", "0.14.0.1", "cuda", None)
    triton = {"serve.attention_backend": "TRITON_ATTN"}
    with pytest.raises(Infeasible, match="accepts fp8 or fp8_e4m3 only: fp8_e5m2 fails as the engine starts"):
        feasibility.check(cfg.build({**triton, "serve.kv_cache_dtype": "fp8_e5m2"}), hopper)
    feasibility.check(cfg.build({**triton, "serve.kv_cache_dtype": "fp8_e4m3"}), hopper)
    feasibility.check(cfg.build({"serve.kv_cache_dtype": "fp8_e5m2"}), hopper)  # another backend: not this rule


def test_a_resumed_study_keeps_a_choice_a_new_rule_rejects_only_where_it_never_measured_it(tmp_path):
    l4 = space.load(PROJECT / "spaces" / "gemma4-e4b-l4.yaml").pinned({"serve.attention_backend": "TRITON_ATTN"})
    hopper = feasibility.Platform("cuda", "NVIDIA H100 80GB HBM3", (9, 0), "0.26.0", "0.14.0.1", "cuda", None,
                                  gpu_memory_gib=79.6)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"

    def kv_choices(study):
        runnable, _ = cli.available_here(l4, hopper, study)
        return next(p.choices for p in runnable.params if p.name == "serve.kv_cache_dtype")

    assert kv_choices(study_mod.open_study("new", url)) == ("auto", "fp8_e4m3")
    # Begun before the rule (its failed trial measured nothing): Optuna's choices stay, the check answers the trial.
    resumed = study_mod.open_study("resumed", url)
    resumed.set_user_attr("definition", {"choices_here": {"serve.kv_cache_dtype": ["auto", "fp8_e4m3", "fp8_e5m2"]}})
    resumed.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                                user_attrs={"config": {"serve.kv_cache_dtype": "fp8_e5m2"}}))
    assert kv_choices(resumed) == ("auto", "fp8_e4m3", "fp8_e5m2")
    # Measured on a machine where it ran: its trials would not compare, so the choice goes (and the resume is refused).
    resumed.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={"config": {"serve.kv_cache_dtype": "fp8_e5m2"}}))
    assert kv_choices(resumed) == ("auto", "fp8_e4m3")
