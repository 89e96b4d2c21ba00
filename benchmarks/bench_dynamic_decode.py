"""One decode step at 4k context: cache-exact dynamic_ntk / dynamic_yarn vs static RoPE (the plain model).

    python benchmarks/bench_dynamic_decode.py      # prints per-step medians and ratios (target <= 1.5)

A SmolLM2-135M-shaped LLaMA (hidden 576, 9 heads, 3 KV heads, head_dim 64) with 4 layers and random weights,
pretrained length L = 2048, so at 4096 tokens dynamic scaling is active. The 4096-token cache is filled once by the
static model (a step's cost does not depend on the cached values, and prompt tokens past L each need their own
attention call in the dynamic models, which would make this script slow); each model then decodes STEPS tokens one
by one from a copy of it; the median step time is reported. Prefill is timed separately on L + 256 tokens. One
torch thread and interleaved rounds, so that load on a shared machine hits every model alike.
"""
import copy
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from longctx_hf import _compat, extend_context

CONTEXT, STEPS, ROUNDS = 4096, 40, 3
config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=1024, max_position_embeddings=2048,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e5})
torch.manual_seed(0)
static = AutoModelForCausalLM.from_config(config).eval()


def twin(method):
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()
    model.load_state_dict(static.state_dict())
    return extend_context(model, method, 4) if method else model


def native_dynamic():
    """transformers' own dynamic NTK (cache-inexact), for reference."""
    model = twin("dynamic_ntk")
    native_config = copy.deepcopy(model.config)
    native_config._attn_implementation_internal = "sdpa"
    native = AutoModelForCausalLM.from_config(native_config).eval()
    native.load_state_dict(static.state_dict())
    return native


models = {"static RoPE": static, "dynamic_ntk (exact)": twin("dynamic_ntk"),
          "dynamic_yarn (exact)": twin("dynamic_yarn"), "transformers dynamic (inexact)": native_dynamic()}
torch.set_num_threads(1)
prompt = torch.randint(0, 1024, (1, CONTEXT))
steps = {name: [] for name in models}
prefill = {name: [] for name in models}
with torch.no_grad():
    filled = _compat.output_cache(static(prompt, use_cache=True))
    for _ in range(ROUNDS):
        for name, model in models.items():
            start = time.perf_counter()
            model(prompt[:, : config.max_position_embeddings + 256])
            prefill[name].append(time.perf_counter() - start)
            cache, token = copy.deepcopy(filled), prompt[:, -1:]
            for _ in range(STEPS):
                start = time.perf_counter()
                out = model(token, **{_compat.cache_keyword(model): cache}, use_cache=True)
                steps[name].append(time.perf_counter() - start)
                cache, token = _compat.output_cache(out), out.logits[:, -1:].argmax(-1)

base_step, base_prefill = statistics.median(steps["static RoPE"]), min(prefill["static RoPE"])
print(f"decode step at {CONTEXT} tokens (median of {ROUNDS * STEPS}); "
      f"prefill of {config.max_position_embeddings + 256} tokens (best of {ROUNDS})")
for name in models:
    step, fill = statistics.median(steps[name]), min(prefill[name])
    print(f"{name:32s} step {step * 1e3:7.2f} ms  ratio {step / base_step:5.2f}   "
          f"prefill {fill:6.2f} s  ratio {fill / base_prefill:5.2f}")
