"""The files the tool reads (space, presets, task) are pydantic models: a key they do not have is
refused in one line naming the file and the key."""

from __future__ import annotations

import pytest

from objectives.tasks import load_task_file
from search import space as space_mod
from search.config import ConfigError

ONE_PARAM = "params:\n  compress.scheme: [none, w4a16]\n"


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("paramz: {}", "unknown section(s) ['paramz']; expected ['constraints', 'description', 'fixed', 'model', "
                   "'params', 'reference']"),
    ("params:\n  serve.max_num_seqs: {low: 8, high: 64, stride: 2}",
     "params.serve.max_num_seqs: unknown key(s) ['stride']; expected ['choices', 'high', 'log', 'low', 'step', "
     "'when']"),
    (f"{ONE_PARAM}constraints:\n  - {{expr: 'serve.max_num_seqs < 9', because: x}}",
     "constraints[0]: unknown key(s) ['because']; expected ['expr', 'why']"),
    ("params:\n  serve.max_num_seqs: {low: eight, high: 64}", "params.serve.max_num_seqs.low: expected a number"),
    ("params:\n  serve.max_num_seqs: {low: 8, high: 64, log: maybe}", "params.serve.max_num_seqs.log: expected "
                                                                       "true or false"),
    ("params:\n  serve.max_num_seqs: 5", "params.serve.max_num_seqs: expected {choices: [...]} or {low: .., high: ..}"),
    (f"{ONE_PARAM}fixed: [1]", "fixed: expected a mapping, got [1]"),
    (f"{ONE_PARAM}constraints:\n  - {{why: x}}", "constraints[0]: missing key 'expr'"),
    ("params:\n  5: [1, 2]", "params: the key 5 is not a name"),
    ("params: {}", "no params to search"),
])
def test_a_space_file_is_its_model(tmp_path, text, message):
    path = _write(tmp_path, "space.yaml", text)
    with pytest.raises(ConfigError) as info:
        space_mod.load(path)
    assert str(info.value) == f"{path}: {message}" or str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)


def test_the_shorthands_and_empty_sections_read_as_before(tmp_path):
    path = _write(tmp_path, "space.yaml", "fixed:\nreference:\nconstraints:\nparams:\n"
                                          "  compress.scheme: [none, w4a16]\n"
                                          "  serve.max_num_seqs: {low: 1, high: 8}\n")
    space = space_mod.load(path)
    assert space.model == "toy" and space.fixed == {} and space.constraints == ()
    assert space.params[0].choices == ("none", "w4a16")
    assert isinstance(space.params[1].low, int) and space.params[1].distribution().__class__.__name__ == "IntDistribution"


@pytest.mark.parametrize("text, message", [
    ("fast: {configs: {}}", "preset fast: unknown key(s) ['configs']; expected ['config', 'source']"),
    ("fast: w4a16", "preset fast: expected {source: ..., config: {...}}, got 'w4a16'"),
    ("fast: {source: x}", "preset fast: no config; give its options under `config:`"),
    ("fast: {config: [1]}", "preset fast: config must be a mapping of dotted options to values, got a list"),
])
def test_a_presets_file_is_its_model(tmp_path, text, message):
    path = _write(tmp_path, "presets.yaml", text)
    with pytest.raises(ConfigError) as info:
        space_mod.load_presets(path)
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize("text, message", [
    ("source: builtin:scenes\nscorer: exact_match\nmetric: x\n", "unknown key 'metric'; allowed: "),
    ("scorer: exact_match\n", "missing key(s) ['source']"),
    ("source: 5\nscorer: exact_match\n", "task 'bad': source must be a string, got 5"),
    ("source: builtin:scenes\nscorer: exact_match\nn_samples: 0\n", "task 'bad': n_samples must be an integer >= 1 "
                                                                   "or null, got 0"),
    ("source: builtin:scenes\nscorer: exact_match\nseed: true\n", "task 'bad': seed must be an integer, got True"),
    ("source: builtin:scenes\nscorer: exact_match\ncolumns: [a]\n", "task 'bad': columns must be a mapping"),
    ("source: builtin:scenes\nscorer: exact_match\n1: x\n", "unknown key 1; allowed: "),
])
def test_a_task_file_is_its_model(tmp_path, text, message):
    path = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ValueError) as info:
        load_task_file(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)
