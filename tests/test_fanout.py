"""`search run --gpus`: the GPUs chosen, one worker bound to each, the workers supervised (exit codes,
stop signals, no process left); the meter a worker builds reads its own GPU only."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from search import fanout
from search.energy.nvml import NvmlMeter
from tests.test_energy import _fake_pynvml

PROJECT = Path(__file__).resolve().parents[1]


def test_choose_all_and_lists():
    assert fanout.choose("all", ["0", "1", "2"]) == ["0", "1", "2"]
    assert fanout.choose("2, 0", ["0", "1", "2"]) == ["2", "0"]


@pytest.mark.parametrize("spec, fragment", [("3", "GPU 3 is not on this machine (present: 0,1,2)"),
                                            ("0,0", "names a GPU twice"), ("0,,1", "comma-separated list")])
def test_choose_refuses(spec, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        fanout.choose(spec, ["0", "1", "2"])


def test_choose_refuses_a_machine_without_gpus():
    with pytest.raises(ValueError, match="no GPU"):
        fanout.choose("all", [])


def test_present_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([50.0] * 4, [True] * 4))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert fanout.present_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert fanout.present_gpus() == []


def test_no_driver_no_gpus_whatever_cuda_visible_devices_says(monkeypatch):
    def no_driver():
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")
    fake = _fake_pynvml([], [])
    fake.nvmlInit = no_driver
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert fanout.present_gpus() == []


def test_present_gpus_counts_nvml_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([50.0] * 4, [True] * 4))
    assert fanout.present_gpus() == ["0", "1", "2", "3"]


def test_each_worker_meter_reads_its_own_gpu_only(monkeypatch, tmp_path):
    """Four GPUs drawing 100, 200, 300, 400 W: the worker bound to GPU 2 prices 300 W, nothing else."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([100.0, 200.0, 300.0, 400.0], [True] * 4))
    for slot in fanout.gpu_slots(["2", "0"], tmp_path):
        for name, value in slot.env.items():
            monkeypatch.setenv(name, value)
        gpu = int(slot.env["CUDA_VISIBLE_DEVICES"])
        meter = NvmlMeter()
        assert meter.gpus == [f"Fake GPU {gpu}"]
        meter.start()
        time.sleep(0.3)
        reading = meter.stop()
        meter.close()
        assert reading.avg_w == pytest.approx(100.0 * (gpu + 1), rel=0.02)
        assert reading.joules_gross == pytest.approx(100.0 * (gpu + 1) * reading.duration_s, rel=0.03)


def _supervise(tmp_path, worker_code: str, labels=("A", "B")) -> subprocess.Popen:
    """A process running `run_workers` over `worker_code`, one worker per label."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from search import fanout
        slots = [fanout.Slot(label, {{"SLOT": label}}, Path({str(tmp_path)!r}) / f"{{label}}.log") for label in {list(labels)!r}]
        sys.exit(fanout.run_workers([sys.executable, "-c", {worker_code!r}], slots))
    """)
    return subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_every_worker_runs_bound_and_the_first_failure_is_the_code(tmp_path):
    code = "import os, sys; print('bound to', os.environ['SLOT']); sys.exit(3 if os.environ['SLOT'] == 'B' else 0)"
    proc = _supervise(tmp_path, code)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3
    assert (tmp_path / "A.log").read_text().strip() == "bound to A"
    assert "B: worker ended with code 3: bound to B" in err


def test_the_watch_line_is_reported_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(fanout, "WATCH_S", 0.0)
    answers = iter(["1 of 2 finished"] * 3 + ["2 of 2 finished"] * 100)
    lines = []
    code = fanout.run_workers([sys.executable, "-c", "import time; time.sleep(3)"],
                              [fanout.Slot("A", {}, tmp_path / "A.log")], report=lines.append,
                              watch=lambda: next(answers))
    assert code == 0
    assert lines[1:] == ["1 of 2 finished", "2 of 2 finished"]


def test_all_workers_well_is_zero(tmp_path):
    proc = _supervise(tmp_path, "print('done')")
    proc.communicate(timeout=120)
    assert proc.returncode == 0


def test_a_stop_signal_reaches_every_worker_and_leaves_no_process(tmp_path):
    """SIGTERM to the fan-out: each worker gets it (and may clean up), then all are gone."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        from pathlib import Path
        def stop(signum, frame):
            Path(os.environ['SLOT'] + '.stopped').write_text(str(signum)); sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        Path(os.environ['SLOT'] + '.ready').write_text('')
        time.sleep(600)
    """)
    proc = _supervise(tmp_path, f"import os; os.chdir({str(tmp_path)!r})\n" + code)
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"{label}.ready").exists() for label in "AB"):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    descendants = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "SIGTERM: stopping 2 worker(s)" in err
    for label in "AB":
        assert (tmp_path / f"{label}.stopped").read_text() == str(int(signal.SIGTERM))
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert alive == []


def test_killed_fanout_leaves_no_worker(tmp_path):
    """SIGKILL gives the fan-out no clean-up: each worker's lifeline stops it."""
    proc = _supervise(tmp_path, "import time; time.sleep(600)")
    deadline = time.monotonic() + 120
    while len(psutil.Process(proc.pid).children(recursive=True)) < 4:  # two lifelines, two workers
        assert time.monotonic() < deadline
        time.sleep(0.2)
    descendants = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert alive == []


@pytest.mark.e2e
def test_cpu_workers_fan_out_on_one_study(tmp_path, serve_python, main_python, capsys):
    """`--gpus`'s path with two CPU workers (the estimate meter) instead of a GPU each: the study and
    its MLflow experiment made once, exactly --trials finished trials between the workers."""
    import optuna
    from mlflow.tracking import MlflowClient

    from search import cli, summaries
    from search.options import RunSettings

    home = tmp_path / "home"
    argv = ["worker", "--study", "fan", "--space", str(PROJECT / "tests" / "data" / "workers_space.yaml"),
            "--home", str(home), "--trials", "4", "--no-early-stop", "--serve-python", serve_python,
            "--compress-python", main_python]
    settings = RunSettings(study="fan", home=home, trials=4)
    slots = [fanout.Slot(f"CPU worker {i}", {}, tmp_path / f"worker{i}.log") for i in range(2)]
    storage = f"sqlite:///{home / 'optuna.db'}"
    home.mkdir()
    assert cli.run_workers(settings, argv, slots, storage, f"sqlite:///{home / 'mlflow.db'}") == 0, (tmp_path / "worker0.log").read_text()[-3000:]
    out, err = capsys.readouterr()
    assert '"counts"' in out and "of 4 trials finished" in err
    study = optuna.load_study(study_name="fan", storage=storage)
    assert summaries.finished(study) == 4
    finished = [t for t in study.get_trials() if t.state.is_finished()]
    assert {t.user_attrs["energy_source"] for t in finished if "energy_source" in t.user_attrs} == {"estimate"}
    assert len({t.user_attrs["worker"] for t in finished if "worker" in t.user_attrs}) == 2  # both worked
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fan")
    parents = client.search_runs([experiment.experiment_id], "tags.`search.study_parent` = 'true'")
    assert [e.name for e in client.search_experiments() if e.name != "Default"] == ["fan"]
    assert len(parents) == 1
