"""The GPU path is the product's (issue 29 item 1): the serving environment's Gemma 4 config fix as
setup.sh installs it, the full-size twin's command (at toy size here), setup.sh's wheelhouse option."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
COMPAT = PROJECT / "plugins" / "vllm_gemma4_compat"
HAS_HOOK = ("import sys; print(json.dumps({'hook': any(type(h).__name__ == 'Gemma4ConfigHook' for h in sys.meta_path), "
            "'transformers': 'transformers' in sys.modules}))")


def _setup_step(pattern: str) -> str:
    """The one line of setup.sh that matches `pattern` (the test runs setup's own command)."""
    lines = [line.strip() for line in (PROJECT / "setup.sh").read_text().splitlines() if re.search(pattern, line)]
    assert len(lines) == 1, lines
    return lines[0]


def _fresh(python: str, env: dict | None = None) -> dict:
    out = subprocess.run([python, "-c", "import json; " + HAS_HOOK], capture_output=True, text=True, check=True,
                         timeout=60, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_setup_installs_the_gemma4_fix_into_the_serving_env(serve_python):
    step = _setup_step(r"vllm_gemma4_compat/install\.sh \.venvs/serve/bin/python")
    subprocess.run(["bash", "-c", step], cwd=PROJECT, check=True, capture_output=True, timeout=60)
    # A fresh process of the environment carries the hook, and has not imported transformers for it.
    assert _fresh(serve_python) == {"hook": True, "transformers": False}


def test_the_stager_installs_the_same_file_into_a_pythonpath_folder(tmp_path, main_python):
    subprocess.run(["bash", str(COMPAT / "install.sh"), "--target", str(tmp_path)], check=True,
                   capture_output=True, timeout=60)
    assert (tmp_path / "vllm_gemma4_compat.py").read_bytes() == (COMPAT / "vllm_gemma4_compat.py").read_bytes()
    assert (tmp_path / "sitecustomize.py").read_text().strip() == "import vllm_gemma4_compat"
    # .venvs/main has no fix of its own: the folder on PYTHONPATH brings it (a GPU stager's --target folder).
    assert _fresh(main_python)["hook"] is False
    assert _fresh(main_python, {**os.environ, "PYTHONPATH": str(tmp_path)})["hook"] is True


ROUND_TRIP = ("from transformers import Gemma4TextConfig; from search.toy_model import TEXT_CONFIG; "
              "c = Gemma4TextConfig.from_dict(Gemma4TextConfig(**TEXT_CONFIG).to_dict()); "
              "print(c.head_dim, getattr(c, 'global_head_dim', None))")


def test_the_fix_makes_gemma4_head_dims_plain_attributes(serve_python):
    out = subprocess.run([serve_python, "-c", ROUND_TRIP], cwd=PROJECT, capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.split() == ["64", "128"]


def test_the_fix_gives_transformers_5_17_configs_their_global_head_dim(tmp_path, main_python):
    # transformers 5.17 (.venvs/main's, and the GPU image's under vLLM 0.26) refuses a plain read of
    # head_dim once a config has been through its per-layer conversion, and keeps no global_head_dim:
    # vLLM 0.26 reads both as attributes.
    subprocess.run(["bash", str(COMPAT / "install.sh"), "--target", str(tmp_path)], check=True,
                   capture_output=True, timeout=60)
    run = [main_python, "-c", "import transformers; assert transformers.__version__.startswith('5.17'); " + ROUND_TRIP]
    bare = subprocess.run(run, cwd=PROJECT, capture_output=True, text=True, timeout=120)
    fixed = subprocess.run(run, cwd=PROJECT, capture_output=True, text=True, check=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert bare.returncode != 0 and "AmbiguousGlobalPerLayerAttributeError" in bare.stderr
    assert fixed.stdout.split() == ["64", "128"]


def test_make_twin_writes_a_checkpoint_the_family_loader_takes(tmp_path, serve_python):
    # The serving env builds it here only because .venvs/main lacks torchvision (Gemma 4's processor);
    # on a GPU machine the compression env does.
    from search.compress.stage import model_fingerprint
    from search.models import family_of
    from search.twin import TOY_TEXT

    out = tmp_path / "twin"
    cmd = [serve_python, "-m", "search", "make-twin", "--out", str(out), "--toy", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads((out / "build_stats.json").read_text())
    assert (out / "BUILD_OK").exists() and stats["logits_finite"] and stats["kv_shared_tensors_added"] > 0
    config = json.loads((out / "config.json").read_text())
    family = family_of(out)
    assert family.name == "gemma4"
    assert len(family.decoder_layers(config)) == TOY_TEXT["num_hidden_layers"]
    assert config["text_config"]["vocab_size"] == TOY_TEXT["vocab_size"]
    assert family.complete_checkpoint(out) == []  # already complete for vLLM
    model = family.load_for_compression(out)
    assert sum(p.numel() for p in model.parameters()) == stats["params_total"]
    # A complete twin is kept, not rebuilt.
    again = subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[0]) == stats
    # A rebuild elsewhere (the next machine of a study) fingerprints the same: its study resumes.
    rebuild = tmp_path / "rebuild"
    subprocess.run(cmd[:5] + [str(rebuild)] + cmd[6:], cwd=PROJECT, capture_output=True, check=True, timeout=300)
    assert model_fingerprint(rebuild, tmp_path / "memo") == model_fingerprint(out, tmp_path / "memo")


def test_make_twin_refuses_a_device_it_does_not_know():
    proc = subprocess.run([sys.executable, "-m", "search", "make-twin", "--out", "x", "--device", "tpu"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_setup_refuses_a_wheelhouse_that_is_not_a_folder(tmp_path):
    proc = subprocess.run(["bash", str(PROJECT / "setup.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SEARCH_WHEELHOUSE": str(tmp_path / "missing")})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"setup: SEARCH_WHEELHOUSE={tmp_path / 'missing'} is not a folder"]


def test_setup_installs_offline_through_one_pip_function():
    # Every install of setup.sh goes through its `pip` function, which adds --no-index --find-links
    # under SEARCH_WHEELHOUSE (a real offline install needs the wheels: see README's GPU section).
    text = (PROJECT / "setup.sh").read_text()
    assert re.search(r'^pip\(\) \{.*-m pip install -q "\$\{offline\[@\]\}" "\$@"; \}', text, re.M)
    assert 'offline=(--no-index --find-links' in text
    assert not re.search(r"-m pip install", text.replace('-m pip install -q "${offline[@]}"', ""))
