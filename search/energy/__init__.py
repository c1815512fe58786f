"""Energy over a workload window: GPU counters (NVML), CPU package counters (RAPL), or an estimate.

One concern a module: meter.py (the reading and the meter base class), one module a meter (nvml.py,
rapl.py, estimate.py), choose.py (``make_meter``: the best source this machine has), arithmetic.py
(pure functions) and files.py (the power trace's CSV and figure). A window's metrics are the
trial's (search/trial.py ``window_metrics``).
"""

from search.energy.arithmetic import counter_delta, integrate_power, net_of_idle, spread, summarize
from search.energy.choose import machine_source, make_meter
from search.energy.estimate import WATTS_PER_BUSY_CORE, EstimateMeter
from search.energy.files import plot_trace, write_trace_csv
from search.energy.meter import DEFAULT_SAMPLE_HZ, EnergyReading, Meter, check_energy_source, meter_kind
from search.energy.nvml import Nvml, NvmlMeter, visible_gpu_ids
from search.energy.rapl import RAPL_ROOT, RaplMeter, rapl_zones

__all__ = ["DEFAULT_SAMPLE_HZ", "RAPL_ROOT", "WATTS_PER_BUSY_CORE", "EnergyReading", "EstimateMeter", "Meter",
           "Nvml", "NvmlMeter", "RaplMeter", "check_energy_source", "counter_delta", "integrate_power",
           "machine_source", "make_meter", "meter_kind", "net_of_idle", "plot_trace", "rapl_zones", "spread",
           "summarize", "visible_gpu_ids", "write_trace_csv"]
