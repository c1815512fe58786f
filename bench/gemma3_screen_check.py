"""The pre-serve screen on Gemma 3 270M (issue 26 items 1 and 2): a product study of
spaces/gemma3-270m.yaml, the reference then tests/data/gemma3_screen_presets.yaml, read back.

- The worker's teacher forcing against the served model: the screen scores the reference on the
  uncompressed weights (screen-reference-*.json, one row per item: 1 where every label token is the
  argmax where the served answer put it); the baseline holds the served greedy answers' label scores.
  Item by item, both should agree (same weights, transformers vs vLLM numerics).
- Each compressed trial: the screen's recovery (pre_serve_recovery) beside the served gate's
  (recovery_mean), or that it was pruned before serving.

Usage (the study first, then this):
  .venvs/main/bin/python -m search run --home HOME --trials 4 --space spaces/gemma3-270m.yaml \\
      --study gemma3-screen --warm-start tests/data/gemma3_screen_presets.yaml
  .venvs/main/bin/python bench/gemma3_screen_check.py --home HOME --out bench/results/.../screen.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--study", default="gemma3-screen")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    study_dir = args.home / "studies" / args.study
    baseline = json.loads(next(study_dir.glob("baseline-*.json")).read_text())
    references = sorted(study_dir.glob("screen-reference-*.json"))
    out: dict = {"command": " ".join(["python", *sys.argv]), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "study": args.study, "space": "spaces/gemma3-270m.yaml",
                 "presets": "tests/data/gemma3_screen_presets.yaml"}
    if references:
        rows = json.loads(references[0].read_text())
        items = baseline["items"]
        assert len(rows) == len(items), (len(rows), len(items))
        per_task: dict[str, dict] = {}
        for item, row in zip(items, rows):
            t = per_task.setdefault(item["task"], {"items": 0, "served": 0.0, "screen": 0.0, "agree": 0})
            t["items"] += 1
            t["served"] += item["label_score"]
            t["screen"] += row.get("greedy", 0.0)
            t["agree"] += int(row.get("greedy", 0.0) == item["label_score"])
        out["reference_served_vs_screen"] = {
            task: {"items": t["items"], "served_accuracy": t["served"] / t["items"],
                   "screen_accuracy": t["screen"] / t["items"], "items_agreeing": t["agree"]}
            for task, t in sorted(per_task.items())}
    study = optuna.load_study(study_name=args.study, storage=f"sqlite:///{args.home / 'optuna.db'}")
    trials = []
    for t in study.trials:
        m = t.user_attrs.get("metrics") or {}
        trials.append({
            "number": t.number, "state": t.state.name, "preset": t.user_attrs.get("preset"),
            "params": {k: v for k, v in t.params.items()},
            "pruned_before_serving": bool(m.get("pruned_before_serving") or t.user_attrs.get("pruned_before_serving")),
            "reason": t.user_attrs.get("reason"),
            "pre_serve_recovery": m.get("pre_serve_recovery"), "pre_serve_loglik_drop": m.get("pre_serve_loglik_drop"),
            "served_recovery_mean": m.get("recovery_mean"),
            "served_recovery_per_task": {k[len("recovery_"):]: v for k, v in m.items()
                                         if k.startswith("recovery_fewshot") and not k.endswith(("_low", "_high"))},
            "energy_j_per_request": m.get("energy_j_per_request")})
    out["trials"] = trials
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2)[:4000])


if __name__ == "__main__":
    main()
