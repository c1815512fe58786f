"""Does vLLM's CPU build serve Gemma 3's sliding window? Its prompt logprobs on a 1100-token prompt
(longer than Gemma 3 270M's 512-token window) against transformers' with the window and without it.

  .venvs/main/bin/python bench/gemma3_sliding_window.py CHECKPOINT SERVER_URL OUT.json
(a vLLM server of CHECKPOINT at SERVER_URL, e.g. `.venvs/serve/bin/python -m vllm.entrypoints.openai.api_server
--model CHECKPOINT --dtype bfloat16 --max-model-len 2048 --enforce-eager`)
"""
import datetime, importlib.metadata as md, sys, json, httpx, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from objectives.text_suite import CAPITALS, OPPOSITES, PLURAL_NOUNS
from transformers import AutoModelForCausalLM, AutoTokenizer
ckpt, url, out_path = sys.argv[1], sys.argv[2], Path(sys.argv[3])
tok = AutoTokenizer.from_pretrained(ckpt)
lines = [f"The capital of {c} is {k}." for c, k in CAPITALS] + [f"The opposite of {a} is {b}." for a, b in OPPOSITES] \
    + [f"One {n}, two {n}s." for n in PLURAL_NOUNS] + [f"{a} plus {b} makes {a + b}." for a in range(2, 9) for b in range(3, 9)]
text = "\n".join(lines)
ids = tok(text).input_ids[:1100]
print("tokens", len(ids))
body = {"model": ckpt, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
r = httpx.post(url + "/v1/completions", json=body, timeout=600).json()
pl = r["choices"][0]["prompt_logprobs"]
served = [None] + [float(next(iter(d.values()))["logprob"]) for d in pl[1:]]
def hf(window):
    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    m.config.sliding_window = window
    with torch.inference_mode():
        logits = m(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [None] + [logits[i - 1, ids[i]].item() for i in range(1, len(ids))]
out = {"command": " ".join(["python", *sys.argv]), "date": datetime.datetime.now().isoformat(timespec="seconds"),
       "transformers": md.version("transformers"), "tokens": len(ids), "sliding_window": 512}
for name, window in (("transformers_window_512", 512), ("transformers_no_window", 100000)):
    ref = hf(window)
    for lo, hi in ((1, 512), (512, len(ids))):
        d = [abs(served[i] - ref[i]) for i in range(lo, hi)]
        out[f"{name}_positions_{lo}_{hi}"] = {"mean_abs_logprob_diff": sum(d) / len(d), "max": max(d)}
out["served_mean_logprob_after_512"] = sum(served[512:]) / len(served[512:])
out_path.write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out, indent=1))
