"""Honesty check: ALiBi injected into SmolLM2-135M (pretrained with RoPE), zero-shot, next to its own RoPE.

Perplexity of the same 2048 tokens of Python stdlib sources (well inside the 8192 it was trained to). ALiBi on
RoPE-pretrained weights is a different positional scheme the weights never saw; it needs real fine-tuning.
Run: python benchmarks/bench_alibi_smollm2_zero_shot.py   (about a minute on a 2-core CPU)
"""
import math
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from longctx_hf import extend_context
from longctx_hf.real_model import smollm2_path

LENGTH = 2048


def text():
    import argparse  # noqa: E401
    import collections
    import dataclasses
    import inspect
    return "\n\n".join(inspect.getsource(m) for m in (argparse, collections, dataclasses))


def perplexity(model, ids):
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].float()
    return math.exp(F.cross_entropy(logits, ids[1:]).item())


def main():
    path = smollm2_path()
    ids = AutoTokenizer.from_pretrained(path)(text(), return_tensors="pt").input_ids[0][:LENGTH]
    for name in ("rope (as pretrained)", "alibi injected, zero-shot"):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        if name.startswith("alibi"):
            extend_context(model, "alibi")
        start = time.perf_counter()
        ppl = perplexity(model, ids)
        print(f"{name:28s} perplexity {ppl:10.2f}  ({time.perf_counter() - start:.1f} s, {len(ids)} tokens)")


if __name__ == "__main__":
    main()
