"""Cache-exact dynamic_ntk / dynamic_yarn against static RoPE (the plain model): prefill of 4 L tokens and one
decode step at 4 L context.

    python benchmarks/bench_dynamic_runtime.py [--threads 1] [--pretrained 512]   # targets: prefill <= 1.5, step <= 1.2

A SmolLM2-135M-shaped LLaMA (hidden 576, 9 heads, 3 KV heads, head_dim 64) with 4 layers and random weights,
pretrained length L (default 512), so past L dynamic scaling is active. Prefill: one forward of 4 L tokens, best of
ROUNDS. Decode: the 4 L-token cache is filled once by each model's own prefill, then STEPS tokens are decoded one by
one from a copy of it; the median step is reported. Rounds are interleaved, so that load hits every model alike.
transformers' own dynamic NTK (cache-inexact) is shown for reference, and the exact runtime with blocks of one
query (one attention call per prompt token past L) to show what the blocks save.
"""
import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from longctx_hf import _compat, extend_context
from longctx_hf.remote import longctx_dynamic_rope as runtime

STEPS, ROUNDS = 40, 3


def models_for(pretrained):
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=1024, max_position_embeddings=pretrained,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e5})
    torch.manual_seed(0)
    static = AutoModelForCausalLM.from_config(config).eval()

    def twin(method):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()
        model.load_state_dict(static.state_dict())
        return extend_context(model, method, 4) if method else model

    native_config = copy.deepcopy(twin("dynamic_ntk").config)
    native_config._attn_implementation_internal = "sdpa"
    native = AutoModelForCausalLM.from_config(native_config).eval()
    native.load_state_dict(static.state_dict())
    per_query = twin("dynamic_ntk")
    for module in per_query.modules():  # the same runtime with blocks of one query: one attention call per token
        if runtime.RUNTIME_ATTRIBUTE in module.__dict__:
            getattr(module, runtime.RUNTIME_ATTRIBUTE).block_size = 1
    return {"static RoPE": static, "dynamic_ntk (exact)": twin("dynamic_ntk"),
            "dynamic_yarn (exact)": twin("dynamic_yarn"), "dynamic_ntk, 1 query/call": per_query,
            "transformers dynamic (inexact)": native}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pretrained", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = models_for(args.pretrained)
    context = 4 * args.pretrained
    prompt = torch.randint(0, 1024, (1, context))
    steps = {name: [] for name in models}
    prefill = {name: [] for name in models}
    caches = {}
    with torch.no_grad():
        for _ in range(ROUNDS):
            for name, model in models.items():
                start = time.perf_counter()
                out = model(prompt, use_cache=True)
                prefill[name].append(time.perf_counter() - start)
                caches[name] = _compat.output_cache(out)
            state = {name: (copy.deepcopy(caches[name]), prompt[:, -1:]) for name in models}
            for _ in range(STEPS):  # one step of each model in turn
                for name, model in models.items():
                    cache, token = state[name]
                    start = time.perf_counter()
                    out = model(token, **{_compat.cache_keyword(model): cache}, use_cache=True)
                    steps[name].append(time.perf_counter() - start)
                    state[name] = _compat.output_cache(out), out.logits[:, -1:].argmax(-1)
    base_step, base_prefill = statistics.median(steps["static RoPE"]), min(prefill["static RoPE"])
    print(f"L = {args.pretrained}, {args.threads} thread(s): prefill of {context} tokens (best of {ROUNDS}); "
          f"decode step at {context} tokens (median of {ROUNDS * STEPS})")
    for name in models:
        step, fill = statistics.median(steps[name]), min(prefill[name])
        print(f"{name:32s} prefill {fill:6.3f} s  ratio {fill / base_prefill:5.2f}   "
              f"step {step * 1e3:7.2f} ms  ratio {step / base_step:5.2f}")


if __name__ == "__main__":
    main()
