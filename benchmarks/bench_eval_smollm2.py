"""SmolLM2-135M zero-shot at 2x its pretrained 8192 tokens (16k), every method, written as it goes.

Part `ppl`: perplexity of tokens 8192-16384 of the default text (Python stdlib sources) with the full 16k context,
for none / yarn / ntk / dynamic_ntk / pi, against the unextended model restricted to an 8k sliding window on the
same tokens (stride 4096: every scored token sees 4k-8k tokens). Part `passkey`: a 16k-token passkey prompt, key at
depth 0.5, one key, for yarn and none. The two parts are independent (run them in parallel to halve wall time).

    python benchmarks/bench_eval_smollm2.py ppl OUTPUT_DIR        # 5 x 16k + 2 x 8k forwards
    python benchmarks/bench_eval_smollm2.py passkey OUTPUT_DIR    # 2 x 16k prefill + 8 greedy tokens

On a shared CPU a 16k forward can take 20 minutes, so two more parts:
    python benchmarks/bench_eval_smollm2.py extra pi,dynamic_ntk OUTPUT_DIR   # in parallel with `ppl`: the same
        16k perplexity, same tokens, written to OUTPUT_DIR/extra.json
    python benchmarks/bench_eval_smollm2.py merge OUTPUT_DIR    # when `ppl` is finished or stopped: fills the runs
        it has not reached from extra.json, then writes results.md and the plot
"""
import json
import sys
import time
from pathlib import Path

from longctx_hf.evaluate import evaluate_model

PARTS = {
    "ppl": dict(methods=["yarn", "none", "ntk", "dynamic_ntk", "pi"], tasks=["ppl"], lengths=[16384],
                num_scored=8192, stride=4096),
    "passkey": dict(methods=["yarn", "none"], tasks=["passkey"], lengths=[16384], depths=[0.5], trials=1),
}



def extra(methods, ppl_output):
    """16k perplexity of `methods` on the same last 8192 tokens as the `ppl` part (its own file: no write race)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longctx_hf import extend_context
    from longctx_hf.evaluate import nll_of_last
    from longctx_hf.evaluate.perplexity import default_text, perplexity
    from longctx_hf.real_model import smollm2_path

    length, scored = 16384, PARTS["ppl"]["num_scored"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    ids = tokenizer(default_text(min_chars=8 * length), return_tensors="pt").input_ids[0][-length:]  # as evaluate_model
    model = AutoModelForCausalLM.from_pretrained(smollm2_path()).eval()
    rows = {}
    for method in methods:
        extend_context(model, method, factor=2)
        start = time.perf_counter()
        ppl = perplexity(nll_of_last(model, ids, scored), scored)
        rows[method] = {"length": length, "ppl": ppl, "tokens_scored": scored,
                        "seconds": time.perf_counter() - start, "computed_by": "bench_eval_smollm2.py extra"}
        print(method, rows[method], flush=True)
        (Path(ppl_output) / "extra.json").write_text(json.dumps(rows, indent=2))


def merge(ppl_output):
    from longctx_hf.evaluate import write_reports

    results = json.loads((Path(ppl_output) / "results.json").read_text())
    rows = json.loads((Path(ppl_output) / "extra.json").read_text())
    baseline = results["baseline_perplexity"][0]["ppl"]
    for run in results["runs"]:
        if run["method"] in rows and not run.get("perplexity"):
            run["perplexity"] = [dict(rows[run["method"]], baseline_ppl=baseline)]
    print(write_reports(results, ppl_output))


if __name__ == "__main__":
    start = time.perf_counter()
    if sys.argv[1] == "extra":
        extra(sys.argv[2].split(","), sys.argv[3])
    elif sys.argv[1] == "merge":
        merge(sys.argv[2])
    else:
        evaluate_model("smollm2", factor=2, output=sys.argv[2], **PARTS[sys.argv[1]])
    print(f"total {time.perf_counter() - start:.0f} s")
