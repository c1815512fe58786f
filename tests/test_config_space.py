import datetime
import hashlib
import re
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest

from search import config as cfg
from search import space as space_mod
from search import study as study_mod
from search.config import ConfigError

PROJECT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_build_rejects_unknown_option_and_value():
    with pytest.raises(ConfigError, match="unknown option 'compress.shceme'"):
        cfg.build({"compress.shceme": "w4a16"})
    with pytest.raises(ConfigError, match="unknown value 'w3a16'"):
        cfg.build({"compress.scheme": "w3a16"})
    with pytest.raises(ConfigError, match="expected an integer"):
        cfg.build({"serve.max_num_seqs": 2.5})


def test_flat_round_trip():
    config = cfg.build({"compress.scheme": "w4a16", "compress.prune.method": "sparsegpt",
                        "compress.prune.base": 0.1, "serve.kv_cache_dtype": "fp8"})
    assert cfg.build(config.flat()) == config
    assert config.flat()["compress.prune.base"] == 0.1


@pytest.mark.parametrize("values, message", [
    ({"serve.max_model_len": 64}, "serve.max_model_len must be >= 128, got 64"),
    ({"serve.gpu_memory_utilization": 0}, "serve.gpu_memory_utilization must be in (0, 1], got 0"),
    ({"compress.prune.base": 1.0}, "compress.prune.base must be in [0, 1), got 1.0"),
    ({"compress.prune.ratios": [0.1, 1.5]}, "compress.prune.ratios[1] must be in [0, 1), got 1.5"),
    ({"workload.rate_rps": 0}, "workload.rate_rps must be > 0, got 0"),
    ({"serve.max_num_seqs": "x"}, "serve.max_num_seqs: expected an integer, got 'x'"),
    ({"serve.max_num_seqs": True}, "serve.max_num_seqs: expected an integer, got True"),
    ({"compress.symmetric": 1}, "compress.symmetric: expected true or false, got 1"),
    ({"workload.tasks": "builtin_scenes"}, "workload.tasks: expected a list, got 'builtin_scenes'"),
    ({"compress.group_size": 48}, "compress.group_size: unknown value 48; expected one of [32, 64, 128, 256]"),
])
def test_a_wrong_value_is_one_line_naming_its_key_and_what_it_takes(values, message):
    with pytest.raises(ConfigError) as info:
        cfg.build(values)
    assert str(info.value) == message
    assert not isinstance(info.value, cfg.CombinationError)


def test_a_whole_float_is_an_integer_and_lists_become_tuples():
    config = cfg.build({"serve.max_num_seqs": 4.0, "compress.prune.ratios": [0.1, 0], "workload.tasks": ["a"]})
    assert config.serve.max_num_seqs == 4 and isinstance(config.serve.max_num_seqs, int)
    assert config.compress.prune.ratios == (0.1, 0.0) and config.workload.tasks == ("a",)


def test_an_unknown_key_is_refused_with_the_known_options_listed():
    known = ", ".join(sorted(cfg.known_keys()))
    for refused in (lambda: cfg.build({"serve.max_num_seq": 4}), lambda: cfg.ServeConfig(max_num_seq=4)):
        with pytest.raises(ConfigError) as info:
            refused()
        assert str(info.value) == f"unknown option 'serve.max_num_seq'; known options: {known}"
    with pytest.raises(ConfigError, match="unknown option 'compress.prune';"):  # a group, not an option
        cfg.build({"compress.prune": {"base": 0.1}})


@pytest.mark.parametrize("values, message", [
    ({"compress.method": "awq", "compress.scheme": "fp8"}, "compress.method=awq applies to scheme w4a16 only"),
    ({"compress.scheme": "bnb_nf4", "compress.prune.method": "wanda", "compress.prune.base": 0.2},
     "bnb_nf4 quantizes at load time; it cannot follow pruning in this tool"),
    ({"serve.max_num_batched_tokens": 4, "serve.max_num_seqs": 8},
     "serve.max_num_batched_tokens must be >= serve.max_num_seqs"),
])
def test_values_each_valid_that_cannot_go_together_are_a_combination_error(values, message):
    with pytest.raises(cfg.CombinationError) as info:
        cfg.build(values)
    assert str(info.value) == message


def test_a_value_wrong_on_its_own_is_told_before_a_combination():
    with pytest.raises(ConfigError) as info:
        cfg.build({"compress.method": "awq", "serve.max_model_len": 5})
    assert not isinstance(info.value, cfg.CombinationError)
    assert str(info.value) == "serve.max_model_len must be >= 128, got 5"


def test_flat_build_flat_round_trip_keeps_names_values_and_tuples():
    config = cfg.build({"compress.prune.method": "sparsegpt", "compress.prune.ratios": [0.1, 0.2],
                        "workload.tasks": ["builtin_scenes"], "serve.memory_budget_gib": 22})
    flat = config.flat()
    assert list(flat) == list(cfg.known_keys())
    assert flat["compress.prune.ratios"] == [0.1, 0.2] and flat["workload.tasks"] == ["builtin_scenes"]
    rebuilt = cfg.build(flat)
    assert rebuilt == config and hash(rebuilt) == hash(config) and rebuilt.flat() == flat
    assert isinstance(rebuilt.compress.prune.ratios, tuple) and isinstance(rebuilt.workload.tasks, tuple)
    over_base = cfg.build({"serve.max_num_seqs": 4}, base=config)
    assert over_base.serve.max_num_seqs == 4 and over_base.compress == config.compress
    with pytest.raises(ValueError, match="frozen"):
        config.serve.max_num_seqs = 4


def test_prune_profiles_expand_per_layer():
    prune = cfg.PruneConfig(method="sparsegpt", base=0.2, shape="ramp_up", protect_first=1, protect_last=1)
    ratios = prune.layer_ratios(6)
    assert ratios[0] == 0.0 and ratios[-1] == 0.0
    assert ratios[1] < ratios[2] < ratios[3] < ratios[4]
    assert cfg.PruneConfig(method="sparsegpt", base=0.1).layer_ratios(4) == [0.1] * 4
    with pytest.raises(ConfigError, match="has 3 values"):
        cfg.PruneConfig(method="sparsegpt", ratios=(0.1, 0.2, 0.3)).layer_ratios(4)


def test_default_space_loads_and_samples():
    space = space_mod.load(PROJECT / "spaces" / "default.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        try:
            config = space.sample(trial)
        except space_mod.Infeasible:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        assert config.serve.max_num_seqs * config.serve.max_model_len <= 16384
        # Conditional parameters appear only when their condition holds.
        assert ("compress.method" in trial.params) == (config.compress.scheme == "w4a16")
        study.tell(trial, 1.0)


ONE_PARAM = "params:\n  compress.scheme: [none, w4a16]\n"


@pytest.mark.parametrize("text, message", [
    ("params: [", "not valid YAML"),
    ("paramz: {}", "unknown section"),
    ("params:\n  compress.schem: {choices: [none]}", "unknown option"),
    ("params:\n  compress.scheme: {choices: [none, w3a16]}", "unknown value 'w3a16'"),
    ("params:\n  serve.max_num_seqs: {low: 64, high: 8}", "inverted range"),
    ("params:\n  serve.max_num_seqs: {low: 8, high: 64, stride: 2}", "unknown key"),
    ("params:\n  compress.method: {choices: [gptq], when: {compress.foo: [w4a16]}}", "neither a param nor fixed"),
    (f"{ONE_PARAM}constraints:\n  - expr: 'serve.max_num_seq * 2 < 4'", "unknown option 'serve.max_num_seq'"),
    (f"{ONE_PARAM}fixed:\n  serve.gpu_memory_utilization: 2.0", "gpu_memory_utilization"),
    # Refused by value, before the baseline starts (issue 19: these used to run a study).
    ("", "the file is empty"),
    ("model: toy\nfixed: {serve.max_num_seqs: 4}", "no params to search"),
    ("params:\n  serve.max_model_len: {low: -5, high: 0}", "params.serve.max_model_len: low -5: serve.max_model_len must be >= 128"),
    ("params:\n  compress.prune.base: {choices: [0.1, 1.5]}", "choice 1.5: compress.prune.base must be in [0, 1)"),
    (f"{ONE_PARAM}fixed: {{workload.tasks: [no_such_task]}}", "unknown task(s) ['no_such_task']"),
    ("params:\n  workload.tasks: {choices: [[builtin_scenes], [nope]]}", "unknown task(s) ['nope']"),
    ("params:\n  compress.scheme: [none]\n  compress.scheme: [w4a16]", "duplicate key 'compress.scheme' at line 3"),
    ("params:\n  compress.method: {choices: [gptq], when: {compress.scheme: [w4a16]}}\n  compress.scheme: [none, w4a16]",
     "listed after it; list compress.scheme first"),
    ("params:\n  compress.scheme: [none, fp8]\n  compress.method: {choices: [gptq], when: {compress.scheme: [w4a16]}}",
     "compress.scheme never takes ['w4a16'] (it takes ['none', 'fp8'])"),
    ("fixed: {compress.scheme: fp8}\nparams:\n  compress.method: {choices: [gptq], when: {compress.scheme: [w4a16]}}",
     "compress.scheme is fixed to 'fp8', so compress.method is never searched"),
    (f"{ONE_PARAM}constraints:\n  - serve.max_num_batched_tokens * 2 > 5",
     "cannot be evaluated on the reference configuration: TypeError"),
])
def test_bad_space_files_fail_with_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        space_mod.load(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_constraint_rejects_before_work(tmp_path):
    space = space_mod.load(write(tmp_path, """
fixed: {serve.max_model_len: 4096}
params:
  serve.max_num_seqs: {choices: [64]}
constraints:
  - {expr: "serve.max_num_seqs * serve.max_model_len <= 16384", why: KV budget}
"""))
    trial = optuna.create_study().ask()
    with pytest.raises(space_mod.Infeasible, match="KV budget"):
        space.sample(trial)


def test_presets_are_valid_configs():
    presets = space_mod.load_presets(PROJECT / "spaces" / "presets" / "seeds.yaml")
    assert len(presets) == 5  # the five seed cards; the reference is every study's first trial anyway
    for values in presets.values():
        cfg.build(values)
    space = space_mod.load(PROJECT / "spaces" / "default.yaml")
    seed_003 = presets["seed_003_observer_w4a16"]
    enqueued = space.enqueue_params(seed_003)
    assert {k: enqueued[k] for k in ("compress.scheme", "compress.method", "compress.group_size",
                                     "compress.targets")} == {"compress.scheme": "w4a16", "compress.method": "rtn",
                                                              "compress.group_size": 128, "compress.targets": "attn_mlp"}
    # What the seed's card leaves open is the reference's, not the sampler's: no pruning, auto KV.
    reference = space.reference_config().flat()
    assert enqueued["compress.prune.method"] == "none" and enqueued["serve.kv_cache_dtype"] == "auto"
    assert all(enqueued[k] == reference[k] for k in enqueued if k not in seed_003)
    # Seed 002's FP8 scheme and max_model_len 4096 lie outside the CPU space: not enqueued, yet the
    # trial runs them as the seed had them; the space's fixed settings still win.
    seed_002 = presets["seed_002_fp8_weights_fp8kv"]
    assert "compress.scheme" not in space.enqueue_params(seed_002)
    study = optuna.create_study()
    study.enqueue_trial(space.enqueue_params(seed_002))
    # Its serving profile (32 sequences x 4096 tokens) exceeds the CPU space's KV budget ...
    with pytest.raises(space_mod.Infeasible, match="KV cache budget"):
        space.sample(study.ask(), seed_002)
    # ... and without that constraint it runs with the seed's own values.
    unconstrained = space_mod.Space(space.path, space.model, space.fixed, space.params, (), space.reference)
    study.enqueue_trial(space.enqueue_params(seed_002))
    config = unconstrained.sample(study.ask(), seed_002)
    assert (config.compress.scheme, config.serve.max_model_len, config.serve.kv_cache_dtype) == ("fp8", 4096, "fp8_e4m3")
    assert config.serve.gpu_memory_utilization == space.fixed["serve.gpu_memory_utilization"]


def test_a_presets_values_the_sampler_never_proposes_are_named():
    space = space_mod.load(PROJECT / "spaces" / "gemma4-e4b-l4.yaml")
    presets = space_mod.load_presets(PROJECT / "spaces" / "presets" / "seeds.yaml")
    # Seed 004's structured pruning (FLAP) and its activation-ordered GPTQ are not in the L4 space.
    assert space.out_of_reach(presets["seed_004_pruned_gptq_w4a16"]) == [
        ("compress.actorder", "weight", ["none", "static"]),
        ("compress.prune.method", "flap", ["none", "sparsegpt", "wanda"])]
    # The best seed of l4-twin-v3-h100 serves 1024 sequences: the space widened for v4 samples them.
    assert space.out_of_reach(presets["seed_001_sparsegpt_gptq_w4a16_fp8kv"]) == []
    # A range is judged by its bounds and step; a value the preset's own choices switch off is not named.
    assert space.out_of_reach({"compress.prune.method": "wanda", "compress.prune.base": 0.5}) == [
        ("compress.prune.base", 0.5, [0.05, 0.3])]
    assert space.out_of_reach({"compress.prune.method": "none", "compress.prune.base": 0.5}) == []
    assert space.out_of_reach({"compress.scheme": "none", "compress.method": "awq2"}) == []


def test_a_presets_file_is_enqueued_in_its_order_with_values_outside_the_space_kept(tmp_path):
    presets_file = tmp_path / "presets.yaml"
    presets_file.write_text("small: {config: {serve.max_num_seqs: 64}}\n"
                            "small_budget: {config: {serve.max_num_seqs: 64, serve.memory_budget_gib: 22}}\n")
    presets = space_mod.load_presets(presets_file)
    space = space_mod.load(PROJECT / "spaces" / "gemma4-e4b-gpu.yaml")
    study = optuna.create_study()
    assert study_mod.warm_start(study, space, presets) == 2
    names = [trial.user_attrs["preset"] for trial in study.get_trials()]
    assert names == ["small", "small_budget"]
    configs = [space.sample(study.ask(), presets[name]) for name in names]
    assert [c.serve.memory_budget_gib for c in configs] == [None, 22]
    assert {c.serve.max_num_seqs for c in configs} == {64}


@pytest.mark.parametrize("argv, message", [
    (["run", "--trials", "x"], "invalid int value"),
    (["run", "--bogus"], "unrecognized arguments"),
    (["run", "--space", "/nonexistent.yaml"], "space file not found"),
    (["run", "--model", "/nonexistent/model"], "model path does not exist"),
    (["run", "--set", "compress.scheme=w3a16"], "unknown value 'w3a16'"),
    (["run", "--set", "serve.max_num_seqs=x"], "--set: serve.max_num_seqs: expected an integer, got 'x'"),
    (["run", "--set", "serve.max_num_seqs=[8"], "--set serve.max_num_seqs=[8: the value is not valid YAML"),
    (["run", "--set", "serve.max_num_seqs"], "--set expects KEY=VALUE, got 'serve.max_num_seqs'"),
    (["run", "--gate", "80"], "80.0 is not in [0, 1]"),
    (["run", "--storage", "postgresql://u:secret@127.0.0.1:9/db"], "cannot reach storage postgresql://u:***@"),
    (["run", "--storage", "postgresql://u:p@ss@127.0.0.1:9/db"], "the password holds an '@'; write it as %40"),
    (["run", "--storage", "postgresql://u@127.0.0.1:9/db?password=secret"], "cannot reach storage"),
    (["run", "--storage", "bogus://u:secret@h/db"], "is not a usable database URL"),
    (["run", "--trials", "-1"], "-1 is below 0"),
    (["run", "--timeout", "0"], "--timeout must be above 0"),
    (["run", "--trial-timeout", "nan"], "--trial-timeout must be above 0"),
    (["run", "--heartbeat", "0"], "--heartbeat is in seconds"),
    (["run", "--per-task-min", "1.5"], "--per-task-min is a fraction"),
    (["run", "--set", "workload.tasks=[nope]"], "unknown task(s) ['nope']"),
    (["run", "--warm-start", "/nonexistent-presets.yaml"], "--warm-start /nonexistent-presets.yaml: no such file"),
    (["run", "--space", str(PROJECT / "tests" / "data" / "e2e_space.yaml"), "--model", "/nonexistent/model"],
     "model path does not exist"),
])
def test_cli_bad_input_fails_fast_with_one_line(argv, message, tmp_path):
    assert_refused(argv, message, tmp_path)


def assert_refused(argv, message, home):
    """How fast each refusal comes is bench/bad_inputs.py's measure (a timed test fails on a loaded machine)."""
    proc = subprocess.run([sys.executable, "-m", "search", *argv, "--home", str(home)],
                          capture_output=True, text=True, cwd=PROJECT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert message in lines[-1]
    assert "secret" not in proc.stderr and "ss@127" not in proc.stderr


def test_a_resume_that_changes_what_defines_the_study_is_refused(tmp_path):
    from search import study as study_mod
    study = study_mod.open_study("defined", f"sqlite:///{tmp_path / 'optuna.db'}", "tpe")
    default_space = space_mod.load(PROJECT / "spaces" / "default.yaml").digest()
    study_mod.check_definition(study, {"gate": 0.8, "sampler": "tpe", "space": default_space})
    study_mod.check_definition(study, {"gate": 0.8, "model": "toy"})  # the same, and a key added
    assert study.user_attrs["definition"] == {"gate": 0.8, "sampler": "tpe", "space": default_space, "model": "toy"}
    other_space = space_mod.load(PROJECT / "tests" / "data" / "e2e_space.yaml").digest()
    other_model = tmp_path / "model"
    other_model.mkdir()
    (other_model / "config.json").write_text("{}")
    for argv, difference in [(["--gate", "0.9"], "gate 0.8 -> 0.9"),
                             (["--sampler", "nsga2"], "sampler 'tpe' -> 'nsga2'"),
                             (["--space", str(PROJECT / "tests" / "data" / "e2e_space.yaml")],
                              f"space '{default_space}' -> '{other_space}'"),
                             (["--set", "serve.max_num_seqs=4"], "space '"),
                             (["--model", str(other_model)], f"model 'toy' -> '{other_model}'")]:
        assert_refused(["run", "--study", "defined", *argv], difference, tmp_path)
    assert_refused(["run", "--study", "defined", "--gate", "0.9"], "give a new --study name", tmp_path)


def test_gpu_space_runs_every_seed_preset_as_its_card_says():
    space = space_mod.load(PROJECT / "spaces" / "gemma4-e4b-gpu.yaml")
    presets = space_mod.load_presets(PROJECT / "spaces" / "presets" / "seeds.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    configs = {}
    for name, values in presets.items():
        study.enqueue_trial(space.enqueue_params(values))
        configs[name] = space.sample(study.ask(), values)
    nf4 = configs["seed_000_bnb_nf4"]
    assert (nf4.compress.scheme, nf4.compress.prune.method, nf4.serve.max_num_seqs) == ("bnb_nf4", "none", 128)
    seed_001 = configs["seed_001_sparsegpt_gptq_w4a16_fp8kv"]
    assert (seed_001.serve.max_num_seqs, seed_001.serve.max_model_len) == (1024, 20000)


def test_a_combination_the_tool_cannot_run_is_infeasible_not_failed():
    space = space_mod.load(PROJECT / "spaces" / "gemma4-e4b-gpu.yaml")
    study = optuna.create_study()
    study.enqueue_trial({"compress.scheme": "bnb_nf4"})
    with pytest.raises(space_mod.Infeasible, match="invalid combination: bnb_nf4"):
        space.sample(study.ask(), {"compress.scheme": "bnb_nf4", "compress.prune.method": "sparsegpt",
                                   "compress.prune.base": 0.1})


def test_a_pinned_param_is_no_longer_searched():
    space = space_mod.load(PROJECT / "spaces" / "gemma4-e4b-gpu.yaml").pinned({"serve.max_num_seqs": 128})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert {space.sample(study.ask()).serve.max_num_seqs for _ in range(10)} == {128}


def test_a_pinned_value_holds_for_the_reference_too():
    space = space_mod.load(PROJECT / "spaces" / "gemma4-e4b-gpu.yaml")
    assert space.reference_config().workload.max_tokens == 256
    assert space.pinned({"workload.max_tokens": 128}).reference_config().workload.max_tokens == 128


def test_workers_starting_together_enqueue_the_presets_once(tmp_path):
    presets = {"a": {"serve.max_num_seqs": 64}, "b": {"serve.max_num_seqs": 512}}
    space = space_mod.load(PROJECT / "spaces" / "gemma4-e4b-gpu.yaml")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s")
    options = study_mod.RunOptions(4, None, "presets.yaml", presets, None, storage_url=url)
    with study_mod.ask_lock(url, "s"):  # a worker counting and asking: the others wait for the lock
        worker = threading.Thread(target=study_mod.queue_first_trials, args=(study, space, options))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not study.get_trials()
    worker.join()
    study_mod.queue_first_trials(study, space, options)  # the next worker finds them queued
    assert [t.user_attrs["preset"] for t in study.get_trials()] == ["reference", "a", "b"]


def test_the_reference_is_every_studys_first_trial_and_runs_exactly_the_reference_configuration(tmp_path):
    """The reference is priced by its own trial, whatever --warm-start says: the bill reads its price there."""
    space = space_mod.load(PROJECT / "spaces" / "gemma4-e4b-l4.yaml")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s")
    study_mod.queue_first_trials(study, space, study_mod.RunOptions(2, None, "none", {}, None, storage_url=url))
    study_mod.queue_first_trials(study, space, study_mod.RunOptions(2, None, "none", {}, None, storage_url=url))
    assert [t.user_attrs["preset"] for t in study.get_trials()] == ["reference"]  # once per study
    presets = study_mod.with_reference(space, {})
    assert space.sample(study.ask(), presets["reference"]) == space.reference_config()


def test_the_reference_trial_keeps_the_reference_settings_where_the_spaces_fixed_ones_differ(tmp_path, monkeypatch):
    """tests/data/smollm2_e2e_space.yaml fixes a terse system turn and GPTQ for the trials and gives the
    reference its own (the model's turn, no compression): the reference trial runs the reference's."""
    from types import SimpleNamespace

    space = space_mod.load(PROJECT / "tests" / "data" / "smollm2_e2e_space.yaml")
    study = optuna.create_study()
    study_mod.queue_first_trials(study, space, study_mod.RunOptions(1, None, "none", {}, None))
    ran = []
    runtime = SimpleNamespace(workdir=tmp_path, pool=SimpleNamespace(discard=lambda: None), slos={})
    objective = study_mod.Objective(study, space, runtime, study_mod.trial_mod.Baseline("test", []),
                                    SimpleNamespace(log_trial=lambda record: None),
                                    study_mod.with_reference(space, {}),
                                    SimpleNamespace(trial_started=lambda *a: None, trial_finished=lambda *a: None,
                                                    stage=lambda name: None), False)
    def run(runtime, config, *args):
        ran.append(config)
        raise RuntimeError("stop here")

    monkeypatch.setattr(study_mod.trial_mod, "run", run)
    study.optimize(objective, n_trials=1, catch=(Exception,))
    assert ran == [space.reference_config()]
    assert (ran[0].workload.verbosity, ran[0].compress.scheme) == ("model", "none")


def _ran_for(seconds: float, **user_attrs) -> optuna.trial.FrozenTrial:
    began = datetime.datetime(2026, 12, 7, 9, 0, 0)
    return optuna.trial.FrozenTrial(number=0, state=optuna.trial.TrialState.COMPLETE, value=1.0, values=None,
                                    datetime_start=began, datetime_complete=began + datetime.timedelta(seconds=seconds),
                                    params={}, distributions={}, user_attrs=user_attrs, system_attrs={},
                                    intermediate_values={}, trial_id=0)


def test_timeout_starts_no_trial_the_studys_median_trial_would_not_finish_before_it(tmp_path):
    """On 2026-12-07 a trial started with a lent GPU's last minutes was cut and recorded interrupted:
    its compression and server start paid for nothing."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s")
    for seconds in (100, 300):
        study.add_trial(_ran_for(seconds))
    study.add_trial(_ran_for(0.1, duplicate_of=1))  # answered from trial 1's measurement: no trial's length
    study.add_trial(_ran_for(0.2, infeasible=True))  # refused before any work: no trial's length either
    assert study_mod.typical_trial_s(study) == 200
    ran = []

    def objective(trial):
        ran.append(trial.number)
        return 1.0

    stopped = study_mod.optimize_until(study, objective, study_mod.RunOptions(10, 150.0, "none", {}, storage_url=url))
    assert ran == [] and re.fullmatch(r"--timeout: 1[45]\d s left, and this study's median trial takes 200 s", stopped)
    # With time for one: the quick trial lowers the median and more start, up to --trials.
    options = study_mod.RunOptions(6, 250.0, "none", {}, storage_url=url)
    assert study_mod.optimize_until(study, objective, options) is None and ran == [4, 5]


def test_a_changed_model_is_refused_naming_the_files_that_differ(tmp_path):
    """2026-12-07: a resume was refused for a changed model fingerprint, and finding the file (the
    twin's build record held its timings) took an investigation: the refusal now names it."""
    from search.compress.stage import model_digests
    model = tmp_path / "twin"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "build_stats.json").write_text('{"seconds": 81.2}')
    study = study_mod.open_study("defined", f"sqlite:///{tmp_path / 'optuna.db'}", "tpe")
    fingerprint, files = model_digests(model, tmp_path / "memo")
    study_mod.check_definition(study, {"model_fingerprint": fingerprint}, files)
    (model / "build_stats.json").write_text('{"seconds": 79.9}')  # the next machine's build
    rebuilt, rebuilt_files = model_digests(model, tmp_path / "memo")
    differ = r"model_fingerprint .* -> .*; the model's files that differ: build_stats.json\)"
    with pytest.raises(ConfigError, match=differ):
        study_mod.check_definition(study, {"model_fingerprint": rebuilt}, rebuilt_files)


def test_the_model_fingerprints_formula_never_changes(tmp_path):
    """Committed studies hold fingerprints of their model: a new formula would refuse their resume."""
    from search.compress.stage import model_digests, model_fingerprint
    model = tmp_path / "m"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    (model / "sub" / "w.safetensors").write_bytes(bytes(range(256)) * 3)
    pinned = "65585e6eba347d28f9f50277e7bb155f41ef468f5bd906ff5a3e97fb9c2d74b6"  # the formula of 2026-12-07
    assert model_fingerprint(model, tmp_path / "memo") == pinned
    assert model_digests(model, tmp_path / "memo") == (pinned, {  # memoised: the same, files and all
        "config.json": hashlib.sha256(b'{"a": 1}').hexdigest(),
        "sub/w.safetensors": hashlib.sha256(bytes(range(256)) * 3).hexdigest()})
