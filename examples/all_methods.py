"""Every RoPE method on a small random LLaMA: extend, inspect, save, reload with plain transformers
(dynamic_ntk / dynamic_yarn / dynamic_longrope / self_extend through longctx_hf.from_pretrained, which installs their runtime: exact
with a KV cache).

    python examples/all_methods.py           # a few seconds, no download
"""
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from longctx_hf import context_info, extend_context, from_pretrained

config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024)
ids = torch.randint(0, 256, (1, 1500))
for method, options in [("pi", {}), ("ntk", {}), ("dynamic_ntk", {}), ("yarn", {"beta_fast": 32, "beta_slow": 1}),
                        ("dynamic_yarn", {}), ("self_extend", {"window": 256})]:
    torch.manual_seed(0)
    model = extend_context(AutoModelForCausalLM.from_config(config).eval(), method, factor=4, **options)
    info = context_info(model)
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        load = from_pretrained if method in ("dynamic_ntk", "dynamic_yarn", "self_extend") \
            else AutoModelForCausalLM.from_pretrained
        reloaded = load(out).eval()
        with torch.no_grad():
            same = torch.equal(model(ids).logits, reloaded(ids).logits)
    print(f"{method:12s} {info.pretrained_length} -> {info.extended_length} tokens, "
          f"attention scaling {info.attention_scaling:.4f}, reload identical: {same}")
