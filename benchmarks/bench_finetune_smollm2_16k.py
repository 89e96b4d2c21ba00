"""The fine-tuning recipe on the real SmolLM2-135M at ×2: YaRN to 16384 tokens, then `longctx_hf.finetune` on
16384-token blocks for as many steps as fit in about an hour on this CPU; perplexity at 16k before and after, and
at 8k (inside the pretrained length: what the training text alone changes, whatever the context length).

    python benchmarks/bench_finetune_smollm2_16k.py [--steps 5] [--work DIR]

Training text: the standard library's package sources (`longctx_hf.search.calibration_text`); evaluation text:
`longctx-hf eval`'s default (the top-level modules), a different text of the same kind (Python). Perplexity: the
last 4096 tokens of 16384 (and of 8192), as in README's evaluation table. Full fine-tuning, float32, AdamW at the YaRN paper's learning rate 2e-5, constant,
gradient checkpointing, batch 1. Each evaluation runs in a fresh process. Writes benchmarks/results/finetune_smollm2_16k.json.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

LENGTH = 16384
EVAL_LENGTHS = (16384, 8192)
RESULT = Path(__file__).with_name("results") / "finetune_smollm2_16k.json"

EVALUATE = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from longctx_hf import extend_context
from longctx_hf.evaluate import nll_of_last
from longctx_hf.evaluate.perplexity import default_text, perplexity
from longctx_hf.real_model import smollm2_path

folder, length = sys.argv[1], int(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
ids = tokenizer(default_text(min_chars=8 * length), return_tensors="pt").input_ids[0][-length:]
if folder == "yarn-zero-shot":
    model = extend_context(AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32), "yarn", 2)
else:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.rope_parameters["rope_type"] == "yarn"
start = time.perf_counter()
ppl = perplexity(nll_of_last(model.eval(), ids, 4096), 4096)
print(json.dumps({"model": folder, "ppl_last_4096": round(ppl, 4), "seconds": round(time.perf_counter() - start, 1)}))
"""


def evaluate(folder) -> dict:
    rows = {}
    for length in EVAL_LENGTHS:
        out = subprocess.run([sys.executable, "-c", EVALUATE, str(folder), str(length)], capture_output=True,
                             text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        rows[length] = json.loads(out.stdout.strip().splitlines()[-1])
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--work", default="/tmp/longctx-finetune-smollm2-16k")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    output = work / "yarn2-ft"
    results = {"length": LENGTH, "steps": args.steps, "before": evaluate("yarn-zero-shot")}
    print(results["before"], flush=True)

    if not (output / "trainer_state.json").is_file():
        from longctx_hf import finetune
        from longctx_hf.search import calibration_text

        data = work / "train.txt"
        data.write_text(calibration_text(min_chars=150_000 * args.steps))
        started = time.perf_counter()
        finetune("smollm2", method="yarn", factor=2, data=str(data), max_length=LENGTH, steps=args.steps,
                 learning_rate=2e-5, warmup_steps=0, lr_scheduler="constant", gradient_checkpointing=True,
                 output_dir=str(output))
        results["train_seconds"] = round(time.perf_counter() - started, 1)
        # this process only loads, trains and saves (the evaluations run in their own processes)
        results["train_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    else:  # trained by an earlier run: keep what it measured
        earlier = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
        results.update({k: earlier[k] for k in ("train_seconds", "train_peak_rss_gib") if k in earlier})
    state = json.loads((output / "trainer_state.json").read_text())
    results["losses"] = [e["loss"] for e in state["log_history"] if "loss" in e]
    results["after"] = evaluate(output)
    print(results["after"], flush=True)
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
