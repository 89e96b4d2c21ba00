"""extend_context on a 70B-shaped LLaMA built on the meta device: time, and no memory for weights.

    python benchmarks/bench_meta_70b.py      # target < 1 s
"""
import resource
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from longctx_hf import extend_context

config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config)
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
extend_context(model, "yarn", 8)
elapsed = time.perf_counter() - start
rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
params = sum(p.numel() for p in model.parameters())
print(f"{params / 1e9:.1f}B parameters on meta: extend_context {elapsed * 1e3:.1f} ms, "
      f"peak RSS {rss_before:.0f} -> {rss_after:.0f} MB, weights on meta: {next(model.parameters()).is_meta}")
