"""ALiBi never materialises heads x n x n: 2-layer, 32-head LLaMA (head_dim 16), 8192 tokens, CPU, fp32.

Prints peak memory (the process's peak RSS growth during the forward, measured in a fresh child per variant) and
time of the ALiBi forward (alibi_sdpa) next to the RoPE + SDPA forward of the same weights, and their ratio.
Target: ALiBi peak < 3 GB and time <= 1.5x RoPE. A full bias would be 32 x 8192^2 x 4 B = 8.6 GB per layer.
Run: python benchmarks/bench_alibi_memory.py [--tokens 8192]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from longctx_hf import extend_context

variant, tokens = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=tokens,
                     attn_implementation="sdpa")
model = LlamaForCausalLM(config).eval()
if variant == "alibi":
    extend_context(model, "alibi")
ids = torch.randint(0, 1024, (1, tokens))
with torch.no_grad():
    model.model(ids[:, :64])  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model.model(ids)  # the decoder only: the lm_head is the same for both and not what is measured
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_gb": peak / 2**20, "growth_gb": (peak - before) / 2**20,
                  "attn": model.config._attn_implementation}))
"""


def run(variant, tokens):
    out = subprocess.run([sys.executable, "-c", CHILD, variant, str(tokens)], capture_output=True, text=True,
                         timeout=1800)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    rope, alibi = run("rope", args.tokens), run("alibi", args.tokens)
    for name, r in (("rope+sdpa", rope), ("alibi", alibi)):
        print(f"{name:10s} ({r['attn']}): {r['seconds']:.2f} s, peak RSS {r['peak_gb']:.2f} GB "
              f"(+{r['growth_gb']:.2f} GB during the forward)")
    print(f"time ratio alibi / rope: {alibi['seconds'] / rope['seconds']:.2f} (target <= 1.5); "
          f"alibi peak {alibi['peak_gb']:.2f} GB (target < 3)")


if __name__ == "__main__":
    main()
