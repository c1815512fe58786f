"""Labelled text tasks, user task files, fidelity under the trial's own prompt, and deployable
request-level settings: the pure parts, without a server."""

from pathlib import Path

import jinja2
import pytest

from objectives import text_suite
from objectives.fidelity import common_suffix, top1_agreement
from objectives.scorers import contains, last_number
from objectives.tasks import load_examples, resolve_task
from search import config as cfg
from search import workload
from search.export import deployable

USER_TASK = Path(__file__).parent / "data" / "user_tasks" / "colours.yaml"
# SmolLM2-135M-Instruct's chat template (it adds its own system turn when a request has none).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_text_tasks_are_deterministic_and_labelled(tmp_path):
    for name in ("text_arithmetic", "text_capitals", "text_opposites", "text_plurals"):
        task = resolve_task(name)
        examples = load_examples(task, tmp_path)
        assert len(examples) == 40 and len({e.id for e in examples}) == 40
        assert all(e.image is None and e.answers for e in examples)
        assert [e.prompt for e in load_examples(task, tmp_path)] == [e.prompt for e in examples]
    assert len(text_suite.rows("arithmetic")) == text_suite.ARITHMETIC_ITEMS


def test_a_task_from_a_users_yaml_path(tmp_path):
    settings = cfg.build({"workload.tasks": [str(USER_TASK)], "workload.n_requests": 4}).workload
    prompts = workload.load_prompts(settings, tmp_path)
    assert [p.id for p in prompts] == ["colours/grass", "colours/snow", "colours/sky", "colours/coal"]
    assert prompts[0].text == "What colour is fresh grass? Answer with one word." and prompts[0].answers == ("green",)
    with pytest.raises(ValueError, match="task file not found"):
        resolve_task(str(tmp_path / "missing.yaml"))


def test_scorers_for_chatty_answers():
    assert last_number("3 + 4 = 7.", ["7"]) == 1.0 and last_number("7 + 7 is 12.", ["14"]) == 0.0
    assert last_number("The total is 1,234.", ["1234"]) == 1.0 and last_number("none", ["1"]) == 0.0
    assert contains("The capital of France is Paris.", ["Paris"]) == 1.0
    assert contains("coldness", ["cold"]) == 0.0 and contains(None, ["x"]) == 0.0


def test_fidelity_compares_the_common_suffix_and_counts_cut_answer_tokens_as_misses():
    base = [None, {"1": -0.1, "2": -3.0}, {"3": -0.1, "4": -3.0}, {"5": -0.1, "6": -3.0}]
    with_system_turn = [None, {"9": -0.5}, {"8": -0.5}] + base[1:]  # the trial's prompt starts with more
    b, t = common_suffix(base, with_system_turn)
    assert len(b) == len(t) == 4 and t[1:] == base[1:]
    assert top1_agreement(b[1:], t[1:]) == 1.0
    assert top1_agreement(b[1:], t[1:], missed_tail=1) == pytest.approx(2 / 3)


def test_deployable_settings_reproduce_the_system_turn_and_decoding():
    system = workload.SYSTEM_PROMPTS["terse"]
    template = workload.with_default_system_turn(SMOLLM2_TEMPLATE, system)
    bare = [{"role": "user", "content": "What is 3 + 4?"}]
    rendered = jinja2.Template(template).render(messages=bare, add_generation_prompt=True)
    as_trial = jinja2.Template(SMOLLM2_TEMPLATE).render(
        messages=[{"role": "system", "content": system}, *bare], add_generation_prompt=True)
    assert rendered == as_trial and "SmolLM" not in rendered
    config = cfg.build({"workload.decoding": "greedy", "workload.max_tokens": 24, "workload.verbosity": "terse"}).flat()
    engine = deployable({"max-num-seqs": 4}, config, Path("/x/chat_template.jinja"))
    assert engine["override-generation-config"] == {"temperature": 0.0, "max_new_tokens": 24}
    assert engine["chat-template"] == "/x/chat_template.jinja" and engine["max-num-seqs"] == 4
    sampled = deployable({}, cfg.build({}).flat(), None)
    assert sampled["override-generation-config"] == {"temperature": 1.0, "top_p": 0.95, "top_k": 64, "max_new_tokens": 16}
