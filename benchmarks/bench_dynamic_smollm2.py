"""One long forward of SmolLM2-135M (pretrained 8192 tokens) with the cache-exact dynamic runtime, against the static
method of the same factor: time, peak memory, and perplexity of the last 4096 tokens of `longctx-hf eval`'s text.

    python benchmarks/bench_dynamic_smollm2.py LENGTH METHOD [METHOD ...]   # e.g. 16384 yarn dynamic_yarn none

Each method runs in its own fresh process (so that ru_maxrss is that model's peak), float32, torch.no_grad, no KV
cache, factor LENGTH / 8192 (none: the unextended model). Prints one JSON line per method.
"""
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from longctx_hf import extend_context
from longctx_hf.evaluate import nll_of_last
from longctx_hf.evaluate.perplexity import default_text, perplexity
from longctx_hf.real_model import smollm2_path

length, method = int(sys.argv[1]), sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
ids = tokenizer(default_text(min_chars=8 * length), return_tensors="pt").input_ids[0][-length:]
model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
if method != "none":
    extend_context(model, method, length / 8192)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
start = time.perf_counter()
ppl = perplexity(nll_of_last(model, ids, 4096), 4096)
print(json.dumps({"method": method, "length": length, "seconds": round(time.perf_counter() - start, 1),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  "rss_after_load_gib": round(loaded, 2), "ppl_last_4096": round(ppl, 4),
                  "threads": torch.get_num_threads()}))
"""


def main():
    length, methods = sys.argv[1], sys.argv[2:]
    for method in methods:
        out = subprocess.run([sys.executable, "-c", CHILD, length, method], capture_output=True, text=True)
        if out.returncode:
            print(json.dumps({"method": method, "length": int(length), "error": out.stderr.strip()[-500:]}))
        else:
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
