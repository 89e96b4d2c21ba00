"""SmolLM2-135M zero-shot at 2x its pretrained 8192 tokens: perplexity of tokens 8k-16k for each method.

Text: Python standard-library sources (present on every machine with Python). Baseline in the same run: the
unextended model ("none") on the full 16k context, and the unextended model restricted to an 8k window on the
same tokens.

    python benchmarks/bench_smollm2_ppl.py     # ~8 minutes on a 2-core CPU
"""
import inspect
import math
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from longctx_hf import extend_context
from longctx_hf.real_model import smollm2_path

PRETRAINED, LENGTH = 8192, 16384


def long_text():
    import argparse, collections, dataclasses, inspect as insp, pathlib, subprocess, typing
    return "\n\n".join(inspect.getsource(m) for m in (argparse, collections, dataclasses, insp, pathlib,
                                                       subprocess, typing))


def nll_of_tail(model, ids, tail_start):
    """Mean negative log-likelihood of ids[tail_start:], projecting hidden states to the vocab in slices."""
    with torch.no_grad():
        hidden = model.model(ids[None]).last_hidden_state[0]
        total = 0.0
        for start in range(tail_start - 1, len(ids) - 1, 1024):
            stop = min(start + 1024, len(ids) - 1)
            logits = model.lm_head(hidden[start:stop]).float()
            total += F.cross_entropy(logits, ids[start + 1:stop + 1], reduction="sum").item()
    return total / (len(ids) - tail_start)


def main():
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(long_text(), return_tensors="pt").input_ids[0][:LENGTH]
    assert len(ids) == LENGTH, len(ids)
    rows = []
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    start = time.perf_counter()
    # Baseline: the same tokens 8k-16k, each seen with (at most) the pretrained 8k window, in 4 strided chunks.
    nll, count = 0.0, 0
    for chunk_end in range(PRETRAINED + 2048, LENGTH + 1, 2048):
        window = ids[chunk_end - PRETRAINED:chunk_end]
        nll += nll_of_tail(base, window, PRETRAINED - 2048) * 2048
        count += 2048
    rows.append(("none, 8k window (baseline)", math.exp(nll / count), time.perf_counter() - start))
    for method in ("none", "pi", "ntk", "dynamic_ntk", "yarn"):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        if method != "none":
            extend_context(model, method, factor=2)
        start = time.perf_counter()
        ppl = math.exp(nll_of_tail(model, ids, PRETRAINED))
        rows.append((f"{method}, full 16k context", ppl, time.perf_counter() - start))
        print(rows[-1], flush=True)
    print("| method | perplexity of tokens 8192-16384 | seconds |\n|---|---|---|")
    for name, ppl, seconds in rows:
        print(f"| {name} | {ppl:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
