"""SmolLM2-135M zero-shot at 2x its pretrained 8192 tokens (16k), every method, written as it goes.

Part `ppl`: perplexity of tokens 8192-16384 of the default text (Python stdlib sources) with the full 16k context,
for none / yarn / ntk / dynamic_ntk / pi, against the unextended model restricted to an 8k sliding window on the
same tokens (stride 4096: every scored token sees 4k-8k tokens). Part `passkey`: a 16k-token passkey prompt, key at
depth 0.5, one key, for yarn and none. The two parts are independent (run them in parallel to halve wall time).

    python benchmarks/bench_eval_smollm2.py ppl OUTPUT_DIR        # 5 x 16k + 2 x 8k forwards
    python benchmarks/bench_eval_smollm2.py passkey OUTPUT_DIR    # 2 x 16k prefill + 8 greedy tokens
"""
import sys
import time

from longctx_hf.evaluate import evaluate_model

PARTS = {
    "ppl": dict(methods=["yarn", "none", "ntk", "dynamic_ntk", "pi"], tasks=["ppl"], lengths=[16384],
                num_scored=8192, stride=4096),
    "passkey": dict(methods=["yarn", "none"], tasks=["passkey"], lengths=[16384], depths=[0.5], trials=1),
}

if __name__ == "__main__":
    part, output = sys.argv[1], sys.argv[2]
    start = time.perf_counter()
    evaluate_model("smollm2", factor=2, output=output, **PARTS[part])
    print(f"total {time.perf_counter() - start:.0f} s")
