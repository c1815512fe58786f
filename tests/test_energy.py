import math
import os
import subprocess
import sys
import time
import types

import pytest

from search import energy
from search.energy import (
    EnergyReading,
    EstimateMeter,
    NvmlMeter,
    RaplMeter,
    counter_delta,
    integrate_power,
    make_meter,
    net_of_idle,
    plot_trace,
    spread,
    summarize,
    visible_gpu_ids,
    write_trace_csv,
)


# --- pure maths --------------------------------------------------------------------------------


def test_counter_delta_plain_and_wrapped():
    assert counter_delta(1_000, 1_750) == 750
    assert counter_delta(2**64 - 10, 5) == 15  # NVML's 64-bit counter restarting at 0
    assert counter_delta(262_143_000_000, 1_000, wrap_at=262_143_328_850) == 329_850  # a RAPL range


def test_integrate_power_against_closed_form():
    assert integrate_power([]) == 0.0
    assert integrate_power([(0.0, 120.0)]) == 0.0
    # Constant 200 W over 2.5 s at uneven spacing: 500 J.
    assert integrate_power([(0.0, 200.0), (0.1, 200.0), (1.7, 200.0), (2.5, 200.0)]) == pytest.approx(500.0)
    # Ramp 100 + 40 t W over [0, 3] s: 100*3 + 20*9 = 480 J; trapezoids are exact on a line.
    ramp = [(t, 100.0 + 40.0 * t) for t in (0.0, 0.25, 1.0, 1.1, 2.0, 3.0)]
    assert integrate_power(ramp) == pytest.approx(480.0)
    # Up then down (triangle 0 -> 300 W -> 0 over 4 s): 600 J.
    assert integrate_power([(0.0, 0.0), (2.0, 300.0), (4.0, 0.0)]) == pytest.approx(600.0)


def test_net_of_idle():
    assert net_of_idle(500.0, 100.0, 3.0) == pytest.approx(200.0)
    assert net_of_idle(250.0, 100.0, 3.0) == 0.0  # noise below idle clamps to 0


def test_summarize_fields():
    trace = [(0.0, 150.0), (5.0, 450.0), (10.0, 300.0)]
    m = summarize(3600.0, idle_w=100.0, duration_s=10.0, trace=trace, n_requests=4, output_tokens=1200)
    assert m == {
        "energy_j": 3600.0,
        "energy_net_j": pytest.approx(2600.0),
        "energy_j_per_request": pytest.approx(900.0),
        "energy_j_per_output_token": pytest.approx(3.0),
        "tokens_per_wh": pytest.approx(1200.0),  # 3600 J is exactly 1 Wh
        "avg_power_w": pytest.approx(360.0),
        "peak_power_w": 450.0,
        "idle_power_w": 100.0,
        "window_s": 10.0,
    }
    assert math.isnan(summarize(10.0, 0.0, 1.0, [], 0, 0)["energy_j_per_request"])


def test_reading_as_metrics_uses_summarize():
    r = EnergyReading("nvml", "test", ["GPU"], 50.0, 2.0, 300.0, 200.0, 150.0, 180.0, [(0.0, 120.0), (2.0, 180.0)])
    assert r.as_metrics(3, 30) == summarize(300.0, 50.0, 2.0, r.trace, 3, 30)


def test_spread():
    s = spread([10.0, 12.0, 14.0, 16.0])
    assert s["mean"] == pytest.approx(13.0)
    assert s["std"] == pytest.approx(math.sqrt(20 / 3))  # sample std (n - 1)
    assert (s["min"], s["max"]) == (10.0, 16.0)
    assert s["rel_std"] == pytest.approx(math.sqrt(20 / 3) / 13.0)
    assert spread([5.0])["std"] == 0.0


def test_visible_gpu_ids():
    assert visible_gpu_ids("1,3") == [1, 3]
    assert visible_gpu_ids("GPU-abc, 2") == ["GPU-abc", 2]
    assert visible_gpu_ids("") == []
    assert visible_gpu_ids("0,-1,2") == [0]  # CUDA ignores everything from an invalid entry on


# --- NvmlMeter against a fake pynvml -----------------------------------------------------------


class _NVMLError(Exception):
    pass


def _fake_pynvml(watts: list[float], counters: list[bool]) -> types.ModuleType:
    """GPUs drawing constant power; the energy counter integrates it from time.monotonic()."""
    t0 = time.monotonic()
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = _NVMLError
    nvml.calls = []
    nvml.nvmlInit = lambda: nvml.calls.append("init")
    nvml.nvmlShutdown = lambda: nvml.calls.append("shutdown")
    nvml.nvmlDeviceGetCount = lambda: len(watts)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: int(uuid.removeprefix("GPU-fake-"))
    nvml.nvmlDeviceGetName = lambda h: f"Fake GPU {h}".encode()  # old pynvml returned bytes
    nvml.nvmlDeviceGetPowerUsage = lambda h: int(watts[h] * 1000)

    def energy(h):
        if not counters[h]:
            raise _NVMLError("Not Supported")
        return int(1_000_000_000 + watts[h] * (time.monotonic() - t0) * 1000)

    nvml.nvmlDeviceGetTotalEnergyConsumption = energy
    return nvml


def test_nvml_meter_counter(monkeypatch):
    fake = _fake_pynvml([100.0, 250.0, 999.0], [True, True, True])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = NvmlMeter([0, 1])
    meter.start()
    time.sleep(0.5)
    r = meter.stop()
    meter.close()
    assert r.source == "nvml" and r.gpus == ["Fake GPU 0", "Fake GPU 1"]
    assert r.joules_gross == pytest.approx(350.0 * r.duration_s, rel=0.02)
    assert r.avg_w == pytest.approx(350.0, rel=0.02)
    assert r.peak_w == pytest.approx(350.0)
    assert len(r.trace) >= 10 * r.duration_s  # >= 10 Hz
    assert r.trace[0][0] < 0.05 and r.trace[-1][0] == pytest.approx(r.duration_s, abs=0.05)
    assert "nvmlDeviceGetTotalEnergyConsumption" in r.method
    assert fake.calls == ["init", "shutdown"]


def test_nvml_meter_idle_and_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([100.0, 250.0, 40.0], [True, True, True]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-fake-2,0")
    meter = NvmlMeter()
    assert meter.gpus == ["Fake GPU 2", "Fake GPU 0"]
    assert meter.measure_idle(0.3) == pytest.approx(140.0, rel=0.02)
    meter.start()
    time.sleep(0.3)
    r = meter.stop()
    assert r.idle_w == pytest.approx(140.0, rel=0.02)
    assert r.joules_net == pytest.approx(0.0, abs=0.03 * r.joules_gross)


def test_nvml_meter_falls_back_to_power_when_counter_unsupported(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([100.0, 250.0], [True, False]))
    meter = NvmlMeter([0, 1])
    meter.start()
    time.sleep(0.5)
    r = meter.stop()
    assert r.source == "nvml-power"
    # GPU 0 by counter over the whole window, GPU 1 by trapezoids from the first to the last sample.
    assert r.joules_gross == pytest.approx(350.0 * r.duration_s, rel=0.02)
    assert "GPU 1 (Fake GPU 1)" in r.method and "trapezoid" in r.method


class _FakeNvml:
    """An NVML adapter (search.energy.nvml.Nvml's methods): one GPU of constant power with a counter."""

    def __init__(self, watts: float):
        self.watts, self.t0, self.closed = watts, time.monotonic(), False

    def count(self) -> int:
        return 1

    def handle(self, gpu_id):
        return gpu_id

    def name(self, handle) -> str:
        return "Adapter GPU"

    def power_w(self, handle) -> float:
        return self.watts

    def energy_mj(self, handle) -> float:
        return 5_000.0 + self.watts * (time.monotonic() - self.t0) * 1000

    def close(self) -> None:
        self.closed = True


def test_nvml_meter_through_a_fake_adapter(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = _FakeNvml(200.0)
    meter = NvmlMeter(nvml=fake)
    meter.start()
    time.sleep(0.3)
    r = meter.stop()
    meter.close()
    assert r.source == "nvml" and r.gpus == ["Adapter GPU"] and fake.closed
    assert r.joules_gross == pytest.approx(200.0 * r.duration_s, rel=0.02)


def test_make_meter_without_nvml_or_rapl_estimates(monkeypatch):
    fake = _fake_pynvml([], [])
    fake.nvmlInit = lambda: (_ for _ in ()).throw(_NVMLError("Driver Not Loaded"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(energy.rapl, "rapl_zones", lambda root=energy.RAPL_ROOT: [])
    assert isinstance(make_meter(None, lambda: [os.getpid()]), EstimateMeter)
    # A GPU that is reachable wins; an empty CUDA_VISIBLE_DEVICES hides it.
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([70.0], [True]))
    assert isinstance(make_meter(None, lambda: []), NvmlMeter)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert isinstance(make_meter(None, lambda: []), EstimateMeter)


# --- RAPL on a fake powercap tree --------------------------------------------------------------


def _zone(path, name, energy_uj, max_uj):
    path.mkdir()
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")


def test_rapl_meter_sums_packages_across_a_wrap(tmp_path):
    _zone(tmp_path / "intel-rapl:0", "package-0", 999_000_000, 1_000_000_000)
    _zone(tmp_path / "intel-rapl:1", "package-1", 5_000_000, 1_000_000_000)
    _zone(tmp_path / "intel-rapl:0:0", "core", 123, 1_000_000_000)  # inside package-0: not added
    meter = RaplMeter(root=str(tmp_path))
    meter.start()
    time.sleep(0.2)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("2000000\n")  # wrapped: +3 J
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("12000000\n")  # +7 J
    time.sleep(0.2)
    r = meter.stop()
    assert r.source == "rapl" and "package-0, package-1" in r.method
    assert r.joules_gross == pytest.approx(10.0)
    assert r.peak_w > 0


# --- EstimateMeter on a real busy process ------------------------------------------------------


def test_estimate_meter_measures_busy_child():
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 20: pass"])
    try:
        meter = EstimateMeter(lambda: [child.pid], watts_per_busy_core=10.0)
        time.sleep(0.2)  # let the interpreter start
        meter.start()
        time.sleep(1.0)
        r = meter.stop()
    finally:
        child.kill()
        child.wait()
    assert r.source == "estimate"
    assert "assumed 10 W per busy core" in r.method
    # One spinning core for ~1 s at 10 W: > 0, and at most one core's worth (+ scheduling slack).
    assert 0 < r.joules_gross <= 10.0 * r.duration_s * 1.1
    assert r.trace and max(w for _, w in r.trace) > 0


def test_estimate_meter_default_states_its_basis():
    meter = EstimateMeter(lambda: [os.getpid()], idle_w=30.0)
    meter.start()
    r = meter.stop()
    assert "Xeon Platinum 8480+" in r.method and "ESTIMATE" in r.method
    assert r.joules_gross >= 30.0 * r.duration_s  # the assumed platform draw is in gross energy


# --- output ------------------------------------------------------------------------------------


def test_trace_csv_and_plot(tmp_path):
    r = EnergyReading("nvml", "test", ["GPU"], 60.0, 2.0, 400.0, 280.0, 200.0, 260.0,
                      [(0.0, 140.0), (1.0, 260.0), (2.0, 200.0)])
    write_trace_csv(r, tmp_path / "trace.csv")
    lines = (tmp_path / "trace.csv").read_text().splitlines()
    assert lines[0] == "t_s,watts" and len(lines) == 4 and lines[2] == "1.0000,260.000"
    plot_trace(r, tmp_path / "trace.png")
    assert (tmp_path / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- a real GPU, when there is one --------------------------------------------------------------


def test_real_nvml_device():
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception as exc:  # no library, no driver
        pytest.skip(f"NVML not available: {exc!r}")
    if count == 0:
        pytest.skip("NVML found no GPU")
    meter = NvmlMeter([0])
    try:
        meter.start()
        time.sleep(1.5)
        r = meter.stop()
    finally:
        meter.close()
    assert r.source in ("nvml", "nvml-power")
    assert r.joules_gross > 0 and 1 < r.avg_w < 2000
    assert len(r.trace) >= 10 * r.duration_s
