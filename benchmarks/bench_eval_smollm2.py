"""SmolLM2-135M zero-shot at 1x (8k) and 2x (16k) its pretrained 8192 tokens, every method, one run.

Perplexity of the same last 4096 tokens (tokens 12k-16k of the default text: Python stdlib sources) with 8k and
16k of context, against the unextended model restricted to an 8k sliding window (stride 2048) on the same
tokens; passkey retrieval at 16k, depths 0.1/0.5/0.9, one key each. Writes partial results as it goes.

    python benchmarks/bench_eval_smollm2.py [OUTPUT_DIR]     # ~45-60 minutes on a shared 2-core CPU
"""
import sys
import time

from longctx_hf.evaluate import evaluate_model

if __name__ == "__main__":
    start = time.perf_counter()
    results = evaluate_model("smollm2", ["yarn", "none", "ntk", "dynamic_ntk", "pi"], factor=2,
                             lengths=[8192, 16384], tasks=["ppl", "passkey"], passkey_lengths=[16384], depths=[0.1, 0.5, 0.9], trials=1,
                             output=sys.argv[1] if len(sys.argv) > 1 else "eval-smollm2")
    print(f"total {time.perf_counter() - start:.0f} s")
