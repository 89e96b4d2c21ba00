"""Prompt log-probabilities of one checkpoint in vLLM (the CPU build), as a user would serve it.

Runs in its own venv (see docs/engines.md). Records whether the engine loads the checkpoint, the maximum length it
derives from the config, and the log-probability of every prompt token after the first.

    python run_vllm.py CHECKPOINT TOKENS.json OUT.json [--model-impl auto|transformers] [--max-model-len N]
"""
import argparse
import json
import os
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB: a 12k-token prompt of a 135M model needs < 1
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: its errors reach us


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("tokens")
    parser.add_argument("out")
    parser.add_argument("--model-impl", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    args = parser.parse_args()
    ids = json.loads(open(args.tokens).read())
    result = {"engine": "vllm", "model_impl": args.model_impl, "max_model_len_asked": args.max_model_len}
    started = time.perf_counter()
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        result["version"] = vllm.__version__
        try:  # the length vLLM derives from the config, read even when the model itself is refused below
            from vllm.engine.arg_utils import EngineArgs

            result["derived_max_length"] = EngineArgs(model=args.checkpoint, trust_remote_code=True, dtype="float32",
                                                      model_impl=args.model_impl).create_model_config().max_model_len
        except Exception as err:
            result["derived_max_length_error"] = f"{type(err).__name__}: {err}"[:300]
        llm = LLM(model=args.checkpoint, dtype="float32", trust_remote_code=True, model_impl=args.model_impl,
                  max_model_len=args.max_model_len, enforce_eager=True, seed=0)
        result["loaded"] = True
        result["max_length"] = llm.llm_engine.model_config.max_model_len
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        output = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        result["logprobs"] = [entry[token].logprob for token, entry in zip(ids[1:], output.prompt_logprobs[1:])]
    except Exception as err:  # the engine refusing is a result, recorded with its own words
        result.setdefault("loaded", False)
        cause = err.__cause__ or err
        result["error"] = f"{type(cause).__name__}: {cause}"[:600]
    result["seconds"] = time.perf_counter() - started
    open(args.out, "w").write(json.dumps(result))


if __name__ == "__main__":
    main()
