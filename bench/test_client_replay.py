"""client_replay.py's arithmetic: the client's arguments for a trial's job, its timed span on the
meter's clock, the span's joules, and the client-over-product ratios. It sits beside the script (the
product's suite reads nothing of bench/): .venvs/main/bin/python -m pytest -q bench/test_client_replay.py"""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import client_replay as cr  # noqa: E402
from search.config import WorkloadConfig  # noqa: E402
from search.energy import EnergyReading  # noqa: E402


def _args(workload, images=True):
    return cr.client_args(workload, model="m", tokenizer="t", base_url="http://127.0.0.1:1", result_dir=Path("/r"),
                          result_file="x.json", input_len=40, images=images)


def _value(args, flag):
    return args[args.index(flag) + 1]


def test_client_sends_the_trials_job():
    args = _args(WorkloadConfig(arrival="all_at_once", n_requests=512, max_tokens=256, warmup_requests=16))
    assert _value(args, "--num-prompts") == "512" and _value(args, "--random-output-len") == "256"
    assert _value(args, "--request-rate") == "inf" and _value(args, "--max-concurrency") == "512"
    assert "--ignore-eos" in args and _value(args, "--dataset-name") == "random-mm"
    assert _value(args, "--random-mm-bucket-config") == "{(448, 448, 1): 1.0}"
    assert _value(args, "--random-mm-limit-mm-per-prompt") == '{"image": 1, "video": 0}'
    assert _value(args, "--num-warmups") == "16"
    closed = _args(WorkloadConfig(arrival="concurrency", concurrency=8, n_requests=64, decoding="greedy"), images=False)
    assert _value(closed, "--max-concurrency") == "8" and _value(closed, "--temperature") == "0"
    assert _value(closed, "--dataset-name") == "random"
    poisson = _args(WorkloadConfig(arrival="rate", rate_rps=2.5))
    assert _value(poisson, "--request-rate") == "2.5" and "--max-concurrency" not in poisson


def test_timed_span_starts_at_the_start_mark():
    assert cr.timed_span(100.0, 112.5, 12.0) == (100.0, 112.0, "start mark + duration")
    assert cr.timed_span(None, 112.5, 12.0) == (100.5, 112.5, "end mark - duration")
    with pytest.raises(RuntimeError):
        cr.timed_span(None, None, 1.0)


def test_span_joules_leave_the_clients_set_up_out():
    # 10 s of set-up at 100 W idle, then 20 s at 300 W; the counter says 7000 J for all 30 s.
    trace = [(t / 10, 100.0 if t < 100 else 300.0) for t in range(0, 301)]
    reading = EnergyReading("nvml", "", [], idle_w=100.0, duration_s=30.0, joules_gross=7000.0, joules_net=4000.0,
                            avg_w=7000 / 30, peak_w=300.0, trace=trace, started_at=50.0)
    got = cr.span_joules(reading, 60.1, 80.0)  # the client's timer: from 10.1 s into the reading, 19.9 s
    assert got["trace_integral_j"] == pytest.approx(300 * 19.9)
    assert got["setup_at_idle_j"] == pytest.approx(7000 - 100 * 10.1)
    assert got["span_offset_s"] == pytest.approx(10.1) and got["outside_span_s"] == pytest.approx(10.1)
    whole = sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(trace, trace[1:]))
    assert got["counter_share_j"] == pytest.approx(7000 * 300 * 19.9 / whole)


def test_ratios_and_the_ten_percent_agreement():
    product = {"energy_j_per_request": 10.0, "energy_j_per_output_token": 0.1}
    ok = cr.ratios({"energy_j_per_request": 10.9, "energy_j_per_output_token": 0.092}, product)
    assert ok["energy_j_per_request"] == pytest.approx(1.09) and ok["agree_within_10pct"]
    off = cr.ratios({"energy_j_per_request": 11.5, "energy_j_per_output_token": 0.1}, product)
    assert not off["agree_within_10pct"]
    assert math.isnan(cr.ratios({}, product)["energy_j_per_request"])
