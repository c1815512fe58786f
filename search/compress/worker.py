"""Child process of the compression stage, in the compression environment (llmcompressor, its torch).

`python -m search.compress.worker --serve` stays up and runs one spec per line of stdin, replying
one JSON line each; importing llmcompressor and torch once saves ~10 s a trial on 2 CPU cores. An
OOM or crash ends this process only: the parent reports the trial as failed and starts a new one.
`python -m search.compress.worker SPEC.json` runs a single spec (debugging, scripts).
A spec with a `screen` scores the compressed model before saving it (search/compress/screen.py): a
model that cannot reach the gate is answered `pruned` and leaves no checkpoint.
The spec names the base model, the recipe, the pipeline, the calibration set, the output folder
and the log file.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from search.compress import screen

# Files of the base checkpoint that a compressed one needs and save_pretrained does not write.
_CARRIED = ("processor_config.json", "preprocessor_config.json", "chat_template.jinja",
            "chat_template.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def calibration_texts(spec: dict, tokenizer) -> list[str]:
    source = spec["dataset"]
    n = spec["n_samples"]
    if source == "builtin":
        from search.compress.calibration import builtin_texts
        texts = builtin_texts(n, spec["seed"])
    else:
        import datasets
        path = Path(source)
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        elif path.suffix in (".jsonl", ".json"):
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(source, split="train")
        ds = ds.shuffle(seed=spec["seed"]).select(range(min(n, len(ds))))
        column = "messages" if "messages" in ds.column_names else "text"
        texts = [tokenizer.apply_chat_template(row[column], tokenize=False) if column == "messages"
                 else row[column] for row in ds]
    return texts


def run(spec: dict) -> dict:
    started = time.perf_counter()
    import datasets
    import torch
    import yaml
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    from search.compress.structured import flap_prune
    from search.models import family_of

    imported = time.perf_counter()
    base, out = Path(spec["base_model"]), Path(spec["out_dir"])
    trust = spec.get("trust_remote_code", False)
    # On a GPU machine the model is compressed there: GPTQ or SparseGPT of a full-size model on the
    # CPU takes hours. Gemma 4 runs the "basic" pipeline, which needs the whole model on one device.
    device_map = "cuda" if torch.cuda.is_available() else None
    family = family_of(base)
    model = family.load_for_compression(base, dtype="auto", trust_remote_code=trust, device_map=device_map)
    model_loaded = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust)
    screen_spec = spec.get("screen")  # the pre-serve screen (search/compress/screen.py), or None
    # The reference's own scores come from these weights before they are compressed (the first
    # screened trial of a study makes them, the rest read them).
    reference = screen.reference_scores(model, tokenizer, screen_spec) if screen_spec else None
    referenced = time.perf_counter()
    ffn_widths = spec.get("ffn_widths")  # structured pruning's per-layer widths, or None
    kwargs = {}
    if spec["needs_calibration"] or ffn_widths:
        texts = calibration_texts(spec["calibration"], tokenizer)
        ds = datasets.Dataset.from_dict({"text": texts}).map(
            lambda row: tokenizer(row["text"], truncation=True, max_length=spec["calibration"]["seq_len"],
                                  add_special_tokens=False),
            remove_columns=["text"])
    if spec["needs_calibration"]:
        kwargs = {"dataset": ds, "num_calibration_samples": len(texts),
                  "max_seq_length": spec["calibration"]["seq_len"], "processor": tokenizer}
    if spec.get("pipeline"):
        kwargs["pipeline"] = spec["pipeline"]
    loaded = time.perf_counter()
    channel_counts = {}
    if ffn_widths:
        # FFN channels go first: the quantization that follows calibrates on the pruned model.
        channel_counts = flap_prune(model, (torch.tensor([ids]) for ids in ds["input_ids"]), ffn_widths)
    pruned = time.perf_counter()
    quantized = bool(yaml.safe_load(Path(spec["recipe_path"]).read_text()))
    if quantized:
        # llmcompressor draws the calibration samples' order from torch's global generator: seeded
        # here, GPTQ's result is the config's, not this process's history (unseeded, one GPTQ config
        # screened 0.665-0.747 over three compressions; seeded, the same score twice: bench/README.md).
        torch.manual_seed(spec["calibration"].get("seed", 0) if spec.get("calibration") else 0)
        oneshot(model=model, recipe=spec["recipe_path"], **kwargs)
    compressed = time.perf_counter()
    # Scored while the compressed model is in memory: a model that cannot reach the gate raises
    # PrunedBeforeServing here, before anything is saved.
    screened = screen.run(model, tokenizer, screen_spec, reference) if screen_spec else None
    screen_end = time.perf_counter()
    if quantized:
        model.save_pretrained(out, save_compressed=True)
        _reset_session()  # the next spec in this process starts from a clean compression session
    else:  # structured pruning alone: a plain bf16 checkpoint
        model.save_pretrained(out)
    kv_shared_added = len(family.complete_checkpoint(out))  # what vLLM needs and save_pretrained leaves out
    tokenizer.save_pretrained(out)
    for name in _CARRIED:
        if (base / name).exists():
            shutil.copy2(base / name, out / name)
    shutil.copy2(spec["recipe_path"], out / "recipe.yaml")
    stats = {"import_s": imported - started, "load_s": loaded - imported - (referenced - model_loaded),
             "screen_reference_s": referenced - model_loaded, "prune_s": pruned - loaded,
             "oneshot_s": compressed - pruned, "screen_s": screen_end - compressed,
             "save_s": time.perf_counter() - screen_end,
             "size_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
             "kv_shared_tensors_added": kv_shared_added, **channel_counts}
    (out / "compress_stats.json").write_text(json.dumps(stats, indent=2))
    # The verdict is this trial's (its prompt settings), not the checkpoint's: it goes back to the
    # study with the stats and stays out of the cache's metadata (search/compress/stage.py).
    return {**stats, "screen": screened} if screened is not None else stats


def _reset_session() -> None:
    if "llmcompressor.core" in sys.modules:
        from llmcompressor.core import reset_session
        reset_session()


def _release_gpu_cache() -> None:
    """This process outlives its jobs: the server that serves the result needs the GPU memory."""
    if "torch" in sys.modules:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def serve() -> None:
    """One spec path per stdin line -> one JSON reply line; each job's output goes to its log file."""
    replies = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        spec = json.loads(Path(line.strip()).read_text())
        with open(spec["log_path"], "w") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                reply = {"ok": True, "stats": run(spec)}
            except screen.PrunedBeforeServing as exc:
                _reset_session()  # oneshot ran; nothing was saved
                reply = {"ok": False, "pruned": str(exc), "screen": exc.result}
            except Exception as exc:
                traceback.print_exc()
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                gc.collect()
                _release_gpu_cache()
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve()
    else:
        print(json.dumps(run(json.loads(Path(sys.argv[1]).read_text()))))
