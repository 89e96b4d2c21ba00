"""Precision of alibi_sdpa (the extra-q/k-dimension trick) at 8192 tokens against a float64 ALiBi reference.

fp32 uses one fused causal call; bf16 re-bases key positions per block of 128 queries. For scale, the error of
plain bf16 SDPA (no ALiBi) against float64 on the same inputs is printed too.
Run: python benchmarks/bench_alibi_precision.py   (about a minute)
"""
import types

import torch
import torch.nn.functional as F

from longctx_hf.remote.alibi_modeling import alibi_sdpa_forward, alibi_slopes

N, HEADS, DIM, SCALE = 8192, 4, 16, 0.25


def reference(q, k, v, slopes):
    """Float64 causal attention with bias -m*(i-j), 512 queries at a time."""
    outs, j = [], torch.arange(N, dtype=torch.float64)
    for a in range(0, N, 512):
        i = torch.arange(a, a + 512, dtype=torch.float64)
        s = q[:, :, a:a + 512].double() @ k.double().transpose(2, 3) * SCALE
        s = s - slopes[:, None, None] * (i[:, None] - j[None, :])
        outs.append(torch.softmax(s.masked_fill(j[None, :] > i[:, None], float("-inf")), -1) @ v.double())
    return torch.cat(outs, 2)


def main():
    torch.manual_seed(0)
    module = types.SimpleNamespace(config=types.SimpleNamespace(num_attention_heads=HEADS), training=False)
    slopes = torch.tensor(alibi_slopes(HEADS), dtype=torch.float64)
    q, k, v = (torch.randn(1, HEADS, N, DIM) for _ in range(3))
    out, _ = alibi_sdpa_forward(module, q, k, v, None, scaling=SCALE)
    print(f"fp32 alibi_sdpa max abs error: {(out.double() - reference(q, k, v, slopes).transpose(1, 2)).abs().max():.2e}")
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out, _ = alibi_sdpa_forward(module, qb, kb, vb, None, scaling=SCALE)
    err = (out.double() - reference(qb, kb, vb, slopes).transpose(1, 2)).abs().max()
    plain = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=SCALE).double()
    plain_err = (plain - reference(qb, kb, vb, torch.zeros(HEADS, dtype=torch.float64))).abs().max()
    print(f"bf16 alibi_sdpa max abs error: {err:.2e}  (plain bf16 SDPA without ALiBi: {plain_err:.2e})")


if __name__ == "__main__":
    main()
