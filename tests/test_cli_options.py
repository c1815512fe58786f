"""run's and worker's flags are the fields of one model (search/options.py): a new option is one field."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from search import cli
from search.options import RunSettings, StudySettings, flag


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("command", ["run", "worker"])
def test_every_field_is_a_flag_and_every_flag_a_field(command):
    flags = _flags(_subparser(command))
    assert list(flags) == [flag(name) for name in RunSettings.model_fields]
    for name, field in RunSettings.model_fields.items():
        action = flags[flag(name)]
        assert action.dest == name
        assert action.help == field.description and field.description
        assert action.default == field.get_default(call_default_factory=True)


@pytest.mark.parametrize("command", ["status", "show", "export"])
def test_the_study_flags_of_the_read_commands_are_the_study_fields(command):
    flags = _flags(_subparser(command))
    for name in StudySettings.model_fields:
        assert flags[flag(name)].dest == name


def test_the_flag_types_and_choices_come_from_the_annotations():
    flags = _flags(_subparser("run"))
    assert flags["--trials"].type is int and flags["--timeout"].type is float and flags["--space"].type is Path
    assert flags["--sampler"].choices == ["tpe", "nsga2", "motpe", "gp", "random"]
    assert flags["--gate-use"].choices == ["point", "lower"]
    assert isinstance(flags["--set"], argparse._AppendAction) and flags["--set"].metavar == "KEY=VALUE"
    assert isinstance(flags["--no-early-stop"], argparse._StoreTrueAction)
    assert flags["--warm-start"].metavar == "none|seeds|PRESETS.yaml"


def test_the_samplers_offered_are_the_ones_the_study_makes():
    from search import study
    assert RunSettings.model_fields["sampler"].annotation.__args__ == study.SAMPLERS


def test_parsed_flags_read_back_as_the_model():
    args = cli.build_parser().parse_args(["worker", "--trials", "3", "--set", "a=1", "--set", "b=2",
                                          "--no-early-stop", "--sampler", "gp"])
    settings = RunSettings.from_namespace(args)
    assert settings == RunSettings(trials=3, set=["a=1", "b=2"], no_early_stop=True, sampler="gp")
    assert RunSettings.from_namespace(cli.build_parser().parse_args(["run"])) == RunSettings()


def test_the_model_refuses_what_is_not_an_option_in_one_line():
    with pytest.raises(ValueError, match="extra"):
        RunSettings(trails=5)
    with pytest.raises(ValueError, match=r"^--trials: .*, got 'many'$"):
        RunSettings.from_namespace(argparse.Namespace(trials="many"))


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at a flag's dashes
    for name, field in RunSettings.model_fields.items():
        assert flag(name) in text
        assert "".join(field.description.split()) in text


def test_run_options_are_typed_and_refuse_unknown_ones():
    from search.study import RunOptions
    assert RunOptions(4, None, "none", {}).trials == 4
    with pytest.raises(ValueError, match="pol_s"):
        RunOptions(4, None, "none", {}, pol_s=1.0)
    with pytest.raises(ValueError, match="valid integer"):
        RunOptions("4", None, "none", {})


@pytest.mark.parametrize("values, message", [
    ({"trials": -1}, "--trials is how many finished trials the study should hold: -1 is below 0"),
    ({"trial_timeout": float("nan")}, "--trial-timeout must be above 0 and finite, got nan"),
    ({"per_task_min": 1.5}, "--per-task-min is a fraction of the reference's quality: 1.5 is not in [0, 1]"),
])
def test_an_options_rule_lives_with_its_field(values, message):
    with pytest.raises(ValueError) as info:
        RunSettings.from_namespace(argparse.Namespace(**values))
    assert str(info.value) == message
