"""bench/gpu/server_starts.py: the parts of a vLLM server start, read from its log."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "server_starts.py"
spec = importlib.util.spec_from_file_location("server_starts", SCRIPT)
server_starts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(server_starts)

# The lines that matter of trial 28's server.log (l4-twin-v4-h100, 2026-12-08), in their order.
LOG = """\
(APIServer pid=5340) INFO 12-08 01:02:38 [api_utils.py:345]        version 0.26.0
(APIServer pid=5340) INFO 12-08 01:02:40 [kernel.py:295] Final IR op priority after setting platform defaults
(EngineCore pid=5428) INFO 12-08 01:03:04 [core.py:116] Initializing a V1 LLM engine (v0.26.0) with config
(EngineCore pid=5428) INFO 12-08 01:03:20 [backends.py:292] Directly load the compiled graph(s) for compile range (1, 4096) from the cache, took 3.044 s
(EngineCore pid=5428) INFO 12-08 01:03:20 [monitor.py:53] torch.compile took 8.00 s in total
(EngineCore pid=5428) INFO 12-08 01:03:31 [core.py:340] init engine (profile, create kv cache, warmup model) took 19.01 s (compilation: 8.00 s)
(APIServer pid=5340) INFO 12-08 01:03:31 [api_server.py:673] Supported tasks: ['generate']
(APIServer pid=5340) INFO 12-08 01:03:43 [base.py:236] Multi-modal warmup completed in 10.190s
(APIServer pid=5340) INFO 12-08 01:03:43 [api_server.py:677] Starting vLLM server on http://127.0.0.1:33123
(APIServer pid=5340) INFO:     Application startup complete.
"""


def test_a_hit_start_splits_into_the_api_servers_start_the_spawn_the_engine_and_the_warm_up():
    parts = server_starts.breakdown(LOG, whole_s=87.47)
    assert parts == {"cache": "hit", "whole": 87.5, "api_config": 2.0, "spawn_gap": 24.0, "engine_init": 27.0,
                     "compile": 8.0, "api_ready": 12.0, "mm_warmup": 10.19, "api_start": 22.5}
    # The parts account for the whole, as the product timed it.
    stages = ("api_start", "api_config", "spawn_gap", "engine_init", "api_ready")
    assert sum(parts[stage] for stage in stages) == pytest.approx(87.5)


def test_a_cold_start_without_the_products_timing_leaves_the_api_start_open():
    parts = server_starts.breakdown(LOG.replace("Directly load the compiled graph", "Compiling a graph"))
    assert parts["cache"] == "cold" and parts["whole"] is None and parts["api_start"] is None


def test_an_engine_that_died_before_ready_gives_the_parts_it_reached(tmp_path):
    died = "\n".join(LOG.splitlines()[:3])
    parts = server_starts.breakdown(died)
    assert parts["spawn_gap"] == 24.0 and parts["engine_init"] is None and parts["api_ready"] is None


def test_a_log_of_something_else_is_refused():
    with pytest.raises(ValueError, match="not a vLLM server log"):
        server_starts.breakdown("INFO 12-08 01:02:38 hello\n")


def test_the_command_reads_a_studys_trial_folders_and_the_exports_times(tmp_path, capsys):
    (tmp_path / "trial-0028").mkdir()
    (tmp_path / "trial-0028" / "server.log").write_text(LOG)
    (tmp_path / "trials.csv").write_text("trial,time_serve_s\n28,87.47\n")
    assert server_starts.main([str(tmp_path), "--trials-csv", str(tmp_path / "trials.csv")]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split("\t")[:3] == ["trial", "cache", "whole"]
    assert row.split("\t")[:4] == ["28", "hit", "87.5", "22.5"]
