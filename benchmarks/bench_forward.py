"""Forward time of a patched model vs the model transformers builds natively from the same rope config.

    python benchmarks/bench_forward.py      # prints the ratio (target <= 1.02)
"""
import copy
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from longctx_hf import extend_context

config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=1024, max_position_embeddings=1024)
torch.manual_seed(0)
patched = extend_context(AutoModelForCausalLM.from_config(config).eval(), "yarn", 4)
native_config = copy.deepcopy(patched.config)
native = AutoModelForCausalLM.from_config(native_config).eval()
native.load_state_dict(patched.state_dict())
ids = torch.randint(0, 1024, (1, 4096))


def best_of(model, repeats=5):
    times = []
    with torch.no_grad():
        model(ids)
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    return min(times)


native_t, patched_t = best_of(native), best_of(patched)
print(f"native {native_t * 1e3:.1f} ms, patched {patched_t * 1e3:.1f} ms, ratio {patched_t / native_t:.3f}")
