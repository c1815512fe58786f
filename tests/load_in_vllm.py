"""Run by the serving environment's python: load checkpoints in vLLM and generate a few tokens.

Usage: python load_in_vllm.py CHECKPOINT ENGINE_ARGS_JSON [GREEDY_JSON] -> prints one line "RESULT {json}".
GREEDY_JSON, {"prompt_token_ids": [[...], ...], "max_tokens": N}, asks for exactly N greedy tokens
per prompt (EOS ignored), returned as "token_ids", and for the most likely next token and its
logprob at every prompt position after the first ("prompt_top1"), to compare with another
implementation.

Usage: python load_in_vllm.py --many JOBS_JSON -> one line "RESULT NAME {json}" per job, where
JOBS_JSON is a file holding [{"name", "checkpoint", "engine"}, ...]: the checkpoints are loaded one
after another in this one process (vLLM and torch are imported once, which is most of a load's time
on a CPU). Run with VLLM_ENABLE_V1_MULTIPROCESSING=0, so that each engine lives in this process.
"""

import gc
import json
import sys


def load(checkpoint, engine_args, greedy=None):
    llm = None
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(model=checkpoint, **engine_args)
        if greedy is None:
            output = llm.generate(["How many red circles?"], SamplingParams(max_tokens=4, temperature=0))
            return {"ok": True, "tokens": len(output[0].outputs[0].token_ids)}
        params = SamplingParams(max_tokens=greedy["max_tokens"], temperature=0, ignore_eos=True, prompt_logprobs=1)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in greedy["prompt_token_ids"]], params)
        top1 = [[next([token, lp.logprob] for token, lp in position.items() if lp.rank == 1)
                 for position in o.prompt_logprobs[1:]] for o in outputs]
        return {"ok": True, "token_ids": [list(o.outputs[0].token_ids) for o in outputs], "prompt_top1": top1}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600]}
    finally:
        del llm
        gc.collect()


if __name__ == "__main__":  # vLLM spawns workers: building the engine must sit under this guard
    if sys.argv[1] == "--many":
        with open(sys.argv[2]) as handle:
            jobs = json.load(handle)
        for job in jobs:
            print(f"RESULT {job['name']} " + json.dumps(load(job["checkpoint"], job["engine"])), flush=True)
    else:
        greedy = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
        print("RESULT " + json.dumps(load(sys.argv[1], json.loads(sys.argv[2]), greedy)), flush=True)
