"""Run by the serving environment's python: load one checkpoint in vLLM and generate a few tokens.

Usage: python load_in_vllm.py CHECKPOINT ENGINE_ARGS_JSON [GREEDY_JSON] -> prints one line "RESULT {json}".
GREEDY_JSON, {"prompt_token_ids": [[...], ...], "max_tokens": N}, asks for exactly N greedy tokens
per prompt (EOS ignored), returned as "token_ids", and for the most likely next token and its
logprob at every prompt position after the first ("prompt_top1"), to compare with another
implementation.
"""

import json
import sys

if __name__ == "__main__":  # vLLM spawns workers: building the engine must sit under this guard
    checkpoint, engine_args = sys.argv[1], json.loads(sys.argv[2])
    greedy = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(model=checkpoint, **engine_args)
        if greedy is None:
            output = llm.generate(["How many red circles?"], SamplingParams(max_tokens=4, temperature=0))
            result = {"ok": True, "tokens": len(output[0].outputs[0].token_ids)}
        else:
            params = SamplingParams(max_tokens=greedy["max_tokens"], temperature=0, ignore_eos=True,
                                    prompt_logprobs=1)
            outputs = llm.generate([{"prompt_token_ids": ids} for ids in greedy["prompt_token_ids"]], params)
            top1 = [[next([token, lp.logprob] for token, lp in position.items() if lp.rank == 1)
                     for position in o.prompt_logprobs[1:]] for o in outputs]
            result = {"ok": True, "token_ids": [list(o.outputs[0].token_ids) for o in outputs], "prompt_top1": top1}
    except Exception as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600]}
    print("RESULT " + json.dumps(result), flush=True)
