"""Child-process entry of the compression stage: `python -m search.compress.worker SPEC.json`.

Runs in the compression environment (llmcompressor, its own torch), so an OOM or crash here ends
this process only. The spec names the base model, the recipe file, the pipeline, the calibration
set and the output folder; the output is complete when this process exits 0.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

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
    from llmcompressor import oneshot
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    imported = time.perf_counter()
    base, out = Path(spec["base_model"]), Path(spec["out_dir"])
    model = AutoModelForImageTextToText.from_pretrained(base, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(base)
    kwargs = {}
    if spec["needs_calibration"]:
        texts = calibration_texts(spec["calibration"], tokenizer)
        ds = datasets.Dataset.from_dict({"text": texts}).map(
            lambda row: tokenizer(row["text"], truncation=True, max_length=spec["calibration"]["seq_len"],
                                  add_special_tokens=False),
            remove_columns=["text"])
        kwargs = {"dataset": ds, "num_calibration_samples": len(texts),
                  "max_seq_length": spec["calibration"]["seq_len"], "processor": tokenizer}
    if spec.get("pipeline"):
        kwargs["pipeline"] = spec["pipeline"]
    loaded = time.perf_counter()
    oneshot(model=model, recipe=spec["recipe_path"], **kwargs)
    compressed = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    for name in _CARRIED:
        if (base / name).exists():
            shutil.copy2(base / name, out / name)
    shutil.copy2(spec["recipe_path"], out / "recipe.yaml")
    stats = {"import_s": imported - started, "load_s": loaded - imported,
             "oneshot_s": compressed - loaded, "save_s": time.perf_counter() - compressed,
             "size_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}
    (out / "compress_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    print(json.dumps(run(json.loads(Path(sys.argv[1]).read_text()))))
