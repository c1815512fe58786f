"""Run by the serving environment's python: load one checkpoint in vLLM and generate a few tokens.

Usage: python load_in_vllm.py CHECKPOINT ENGINE_ARGS_JSON -> prints one line "RESULT {json}".
"""

import json
import sys

if __name__ == "__main__":  # vLLM spawns workers: building the engine must sit under this guard
    checkpoint, engine_args = sys.argv[1], json.loads(sys.argv[2])
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(model=checkpoint, **engine_args)
        output = llm.generate(["How many red circles?"], SamplingParams(max_tokens=4, temperature=0))
        result = {"ok": True, "tokens": len(output[0].outputs[0].token_ids)}
    except Exception as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600]}
    print("RESULT " + json.dumps(result), flush=True)
