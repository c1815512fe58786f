"""The search's own bill on hand-made trials: sums by stage (failed and pruned trials' too), the
baseline, and the break-even point with and without a saving."""

import json

import optuna
import pytest
from optuna.trial import TrialState

from search import bill
from search.bill import Spend, TrialCost, make_bill, requests_to_break_even, stage_of
from search.summaries import study_bill

REFERENCE = {"compress.scheme": "none", "workload.tasks": ["a", "b"]}
COMPLETE = {"time_check_s": 0.1, "spent_check_j": 1.0, "time_compress_s": 10.0, "spent_compress_j": 100.0,
            "time_serve_s": 5.0, "spent_serve_j": 50.0, "time_workload_s": 2.0, "spent_workload_j": 20.0,
            "time_repeat_1_s": 2.0, "spent_repeat_1_j": 22.0, "energy_j_per_request": 1.5, "trial_s": 30.0}
PRUNED = {"time_compress_s": 8.0, "spent_compress_j": 80.0, "time_screen_s": 1.0, "spent_screen_j": 10.0,
          "pruned_at_screen": 1.0}
FAILED_IN_COMPRESSION = {"time_check_s": 0.1, "spent_check_j": 1.0, "time_compress_s": 3.0, "spent_compress_j": 30.0}
BASELINE = {"reference": REFERENCE,
            "spent": {"time_serve_s": 4.0, "spent_serve_j": 40.0, "time_workload_s": 2.0, "spent_workload_j": 25.0}}


def trials() -> list[TrialCost]:
    """The reference's own trial (2.0 J/request), a cheaper complete one, a pruned and a failed one."""
    return [TrialCost(0, COMPLETE, {"compress.scheme": "w4a16"}, 1.5), TrialCost(1, PRUNED),
            TrialCost(2, FAILED_IN_COMPRESSION), TrialCost(3, {}, json.loads(json.dumps(REFERENCE)), 2.0)]


def test_stage_metrics_are_named_by_stage_and_repeats_are_measured_windows():
    assert stage_of("time_compress_s") == ("compress", "seconds")
    assert stage_of("spent_repeat_2_j") == ("workload", "joules")
    assert stage_of("energy_j_per_request") is None and stage_of("trial_s") is None


def test_every_trial_the_search_paid_for_is_summed_by_stage_with_the_baseline():
    paid = make_bill(trials(), BASELINE, trials()[0], "nvml")
    assert list(paid.stages) == ["check", "compress", "serve", "screen", "workload"]  # the order trials run them
    assert paid.stages["compress"] == Spend(21.0, 210.0)  # complete, pruned and failed
    assert paid.stages["workload"] == Spend(4.0, 42.0)  # the measured window and its repeat
    assert paid.stages["check"] == Spend(pytest.approx(0.2), 2.0)
    assert paid.baseline == Spend(6.0, 65.0)
    assert paid.total == Spend(pytest.approx(0.2 + 21 + 5 + 1 + 4 + 6), 2 + 210 + 50 + 10 + 42 + 65)
    assert paid.unmetered_trials == 0


def test_break_even_is_the_search_joules_over_the_saving_per_request():
    assert requests_to_break_even(1000.0, 2.0, 1.5) == 2000
    assert requests_to_break_even(1001.0, 2.0, 1.5) == 2002  # a part of a request is a whole one
    assert requests_to_break_even(1000.0, 2.0, 2.0) is None
    assert requests_to_break_even(1000.0, 2.0, 2.5) is None
    paid = make_bill(trials(), BASELINE, trials()[0], "nvml")
    assert (paid.reference_j_per_request, paid.reference_from) == (2.0, "trial 3, which ran the reference configuration")
    assert paid.break_even_requests == 379 * 2  # 379 J over a saving of 0.5 J per request
    assert paid.break_even == "after 758 requests of the measured workload"


def test_no_saving_never_breaks_even_and_neither_does_no_feasible_trial():
    costly = TrialCost(0, COMPLETE, {"compress.scheme": "w4a16"}, 2.5)
    never = make_bill([costly, trials()[3]], BASELINE, costly, "nvml")
    assert never.break_even_requests is None
    assert never.break_even == "never: the best feasible configuration saves nothing over the reference"
    assert make_bill(trials(), BASELINE, None, "nvml").break_even == "never: no feasible configuration yet"


def test_the_reference_is_priced_by_the_trials_that_ran_its_configuration():
    as_stored = json.loads(json.dumps(REFERENCE))  # lists, as the storage gives them back
    runs = [*trials()[:3], TrialCost(3, COMPLETE, as_stored, 1.8), TrialCost(4, COMPLETE, as_stored, 1.9)]
    paid = make_bill(runs, {"reference": REFERENCE}, runs[0], "nvml")
    assert paid.reference_j_per_request == pytest.approx(1.85)  # measured twice: the mean
    assert paid.reference_from == "the mean of trials 3, 4, which ran the reference configuration"
    assert paid.baseline is None  # made before its stages were metered
    unknown = make_bill(trials()[:3], {"reference": REFERENCE}, trials()[0], "nvml")
    assert unknown.reference_j_per_request is None and unknown.break_even == "unknown: no reference J/request"


def test_trials_made_before_stage_metering_are_counted_not_guessed():
    old = TrialCost(5, {"time_compress_s": 7.0, "time_serve_s": 1.0})
    paid = make_bill([*trials(), old], BASELINE, None, "nvml")
    assert paid.unmetered_trials == 1
    assert paid.stages["compress"] == Spend(28.0, 210.0)


def test_status_lines_say_an_estimate_is_one_and_mlflow_gets_numbers_and_sentences():
    paid = make_bill(trials(), BASELINE, trials()[0], "estimate")
    lines = bill.describe(paid)
    assert "ESTIMATE" in lines[0] and "not a measurement" in lines[0]
    assert any(line.split()[:1] == ["compression"] and "210.0 J" in line for line in lines)
    assert lines[-1] == "  break-even: after 758 requests of the measured workload"
    metrics, tags = bill.mlflow_fields(paid)
    assert metrics["bill_compress_j"] == 210.0 and metrics["bill_baseline_j"] == 65.0
    assert metrics["bill_break_even_requests"] == 758.0 and metrics["bill_reference_j_per_request"] == 2.0
    assert tags["bill_energy_source"] == "estimate" and tags["bill_reference"] == "trial 3, which ran the reference configuration"
    never = make_bill(trials(), BASELINE, None, "nvml")
    assert "bill_break_even_requests" not in bill.mlflow_fields(never)[0]
    assert bill.as_dict(never)["break_even"] == "never: no feasible configuration yet"


def test_the_bill_of_a_study_reads_every_finished_trial_and_the_baseline():
    study = optuna.create_study()
    study.set_user_attr("definition", {"energy_source": "rapl"})
    study.set_user_attr("baseline", BASELINE)
    study.add_trial(optuna.trial.create_trial(value=1.5, user_attrs={
        "metrics": COMPLETE, "config": {"compress.scheme": "w4a16"}, "feasible": True}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={"stage_times": PRUNED}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"stage_times": FAILED_IN_COMPRESSION}))
    study.add_trial(optuna.trial.create_trial(value=float("inf"), user_attrs={  # cannot run here
        "infeasible": True, "stage_times": {"time_check_s": 0.1, "spent_check_j": 1.0}}))
    study.add_trial(optuna.trial.create_trial(value=2.0, user_attrs={  # the reference's own trial
        "metrics": {}, "config": REFERENCE, "feasible": True}))
    study.enqueue_trial({})  # waiting: nothing spent yet
    paid = study_bill(study)
    assert paid.energy_source == "rapl" and paid.best_trial == 0 and paid.best_j_per_request == 1.5
    assert paid.stages["compress"] == Spend(21.0, 210.0) and paid.stages["check"].joules == 3.0
    assert paid.break_even_requests == 760  # 380 J over 0.5 J per request
