"""ALiBi (Press et al. 2022, arXiv 2108.12409) for transformers decoders whose config says rope_type "alibi".

Self-contained (torch + transformers only): longctx_hf copies this file next to config.json, so
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where longctx_hf is not installed.
Importing it registers, in transformers' own registries:
- rope type "alibi": inverse frequencies 0, so the model's rotary module yields cos = 1, sin = 0 (RoPE is off);
- attention functions alibi_eager, alibi_sdpa, alibi_flex_attention, alibi_fa2, each with its mask function
  (a name without a mask function gets attention_mask=None: padding would be silently ignored).
Every function adds -m_h * (i - j) to the logits of query i and key j; the slopes m_h depend only on the number of
query heads, so they are computed from the module's config (nothing extra is stored in the checkpoint).
Positions are the indices in the key/value sequence: with left or right padding they differ from the real token
positions by a constant per row, which softmax ignores, so padded batches equal unpadded runs exactly.
"""
from __future__ import annotations

import math
import types

import torch
from transformers.masking_utils import (
    eager_mask,
    flash_attention_mask,
    flex_attention_mask,
    sdpa_mask,
)

from . import longctx_compat as compat
from .longctx_compat import InternalsChanged  # noqa: F401  (this form makes transformers ship the sibling file)

ROPE_TYPE = "alibi"
# standard transformers name -> the ALiBi function registered under its own name
ATTENTION_NAMES = {"eager": "alibi_eager", "sdpa": "alibi_sdpa", "flex_attention": "alibi_flex_attention",
                   "flash_attention_2": "alibi_fa2"}
DEFAULT_ATTENTION = "alibi_sdpa"
QUERY_BLOCK = 128  # half precision: queries per block, so m*(j - block start) stays small where it matters


def alibi_slopes(num_heads: int) -> list[float]:
    """The paper's head slopes: 2^(-8h/n) for n a power of two; otherwise the slopes of the nearest lower power of
    two, then every other slope of the series for twice that, until n heads."""
    def geometric(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    lower = 2 ** int(math.floor(math.log2(num_heads)))
    return geometric(lower) + geometric(2 * lower)[0::2][: num_heads - lower]


def _slopes(module, device) -> torch.Tensor:
    """Float32 slopes for the module's query heads (cached on the module, never saved in the state dict)."""
    cached = getattr(module, "_alibi_slopes", None)
    if cached is None or cached.device != device:
        cached = torch.tensor(alibi_slopes(module.config.num_attention_heads), dtype=torch.float32, device=device)
        module._alibi_slopes = cached
    return cached


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def _distance_bias(slopes, q_len, kv_len, device):
    """m_h * (j - i) for query i (the last q_len of kv_len positions) and key j: heads x q_len x kv_len floats."""
    i = torch.arange(kv_len - q_len, kv_len, device=device, dtype=torch.float32)
    j = torch.arange(kv_len, device=device, dtype=torch.float32)
    return slopes[:, None, None] * (j[None, None, :] - i[None, :, None])


def alibi_eager_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain matmul attention plus the ALiBi bias (materialises heads x q x kv, like eager itself)."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scaling
    scores = scores + _distance_bias(_slopes(module, query.device), query.shape[2], key.shape[2], query.device)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[2]].float()
    weights = torch.softmax(scores, dim=-1).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _with_bias_dimension(query, key, value, slopes, key_reference, scaling):
    """q gets m_h, k gets (j - reference)/scaling, so q.k*scaling gains m_h*(j - reference): ALiBi up to a per-row
    constant. Head dims are zero-padded to a multiple of 8 (an odd head dim drops SDPA off its fast kernel)."""
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[2]
    width = -(-(dim + 1) // 8) * 8
    positions = torch.arange(kv_len, device=key.device, dtype=torch.float32) - key_reference
    q_extra = query.new_zeros(batch, heads, q_len, width - dim)
    q_extra[..., 0] = slopes.to(query.dtype)[None, :, None]
    k_extra = key.new_zeros(batch, key.shape[1], kv_len, width - dim)
    k_extra[..., 0] = (positions / scaling).to(key.dtype)
    v_extra = value.new_zeros(batch, value.shape[1], kv_len, width - dim)
    return torch.cat([query, q_extra], -1), torch.cat([key, k_extra], -1), torch.cat([value, v_extra], -1)


def _sdpa(query, key, value, mask, is_causal, scaling, dropout):
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                            is_causal=is_causal, scale=scaling)


def alibi_sdpa_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """ALiBi through SDPA with one extra q/k dimension: no bias tensor, O(n) memory, SDPA's fused causal kernel.

    Since -m(i - j) and +m*j differ by a constant per query row, the bias needs only the key index. Float32 keeps
    m*j exact enough in one call (absolute error ~1e-4 at 8k tokens, before softmax); half precision re-bases j
    per block of QUERY_BLOCK queries so the values that matter stay small.
    """
    dropout = dropout if module.training else 0.0
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    slopes = _slopes(module, query.device)
    q_len, kv_len, dim = query.shape[2], key.shape[2], value.shape[-1]
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, :kv_len]
    full_precision = query.dtype == torch.float32
    block = q_len if full_precision or q_len <= QUERY_BLOCK else QUERY_BLOCK
    outputs = []
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        first_position = kv_len - q_len + start  # key index of this block's first query
        reference = (kv_len - 1) / 2 if full_precision else first_position
        q, k, v = _with_bias_dimension(query[:, :, start:stop], key, value, slopes, reference, scaling)
        if attention_mask is not None:
            mask, is_causal = attention_mask[:, :, start:stop], False
        elif q_len == kv_len and block == q_len:
            mask, is_causal = None, True
        elif stop - start == 1:
            mask, is_causal = None, False  # one decoding query sees every cached key
        else:
            rows = torch.arange(first_position, first_position + stop - start, device=query.device)
            mask, is_causal = torch.arange(kv_len, device=query.device)[None, :] <= rows[:, None], False
        outputs.append(_sdpa(q, k, v, mask, is_causal, scaling, dropout)[..., :dim])
    return torch.cat(outputs, 2).transpose(1, 2).contiguous(), None


def alibi_flex_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """flex_attention with an ALiBi score_mod: the bias is computed per score, never materialised."""
    from torch.nn.attention.flex_attention import BlockMask

    if dropout and module.training:
        raise ValueError("alibi_flex_attention does not support attention dropout in training")
    slopes = _slopes(module, query.device)
    offset = key.shape[2] - query.shape[2]

    def alibi_score(score, batch_idx, head_idx, q_idx, kv_idx):
        return score + slopes[head_idx] * (kv_idx - q_idx - offset).to(torch.float32)

    block_mask = attention_mask if isinstance(attention_mask, BlockMask) else None
    if attention_mask is not None and block_mask is None:
        raise ValueError("alibi_flex_attention expects a BlockMask from transformers' flex mask function")
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    output = compat.flex_attention(query, key, value, score_mod=alibi_score, block_mask=block_mask, scale=scaling,
                                   training=module.training)
    return output.transpose(1, 2).contiguous(), None


def alibi_fa2_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """FlashAttention 2 with its native `alibi_slopes` (CUDA + flash-attn only; unpadded batches)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise ImportError("alibi_fa2 needs the flash-attn package on a CUDA device; use alibi_sdpa instead") from err
    if attention_mask is not None:
        raise NotImplementedError("alibi_fa2 handles unpadded batches only; use alibi_sdpa for padded batches")
    dropout = dropout if module.training else 0.0
    slopes = _slopes(module, query.device)
    output = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=dropout,
                             softmax_scale=scaling, causal=query.shape[2] > 1, alibi_slopes=slopes)
    return output, None


def _rotary_off(config, device=None, seq_len=None, layer_type=None):
    """The rope type "alibi": zero frequencies, so cos = 1 and sin = 0 at every position (rotary disabled).

    Refuses a model being built with any attention but an ALiBi one: it would have no positions at all."""
    implementation = config._attn_implementation
    if implementation not in ATTENTION_NAMES.values():
        raise ValueError(f"this config has rope_type 'alibi' (RoPE off, positions from ALiBi attention) but the model "
                         f"is being built with attention {implementation!r}, which would run without any position "
                         "information. Load it with longctx_hf.from_pretrained(path) or "
                         "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True), and pick the attention "
                         f"among {sorted(ATTENTION_NAMES.values())}")
    return torch.zeros(compat.rotary_dim(config) // 2, dtype=torch.float32, device=device), 1.0


def alibi_attention_name(requested) -> str:
    """Map a standard attention name to its ALiBi function; ALiBi names pass; anything else is refused."""
    if requested is None:
        return DEFAULT_ATTENTION
    if requested in ATTENTION_NAMES.values():
        return requested
    if requested in ATTENTION_NAMES:
        return ATTENTION_NAMES[requested]
    allowed = ", ".join(list(ATTENTION_NAMES) + list(ATTENTION_NAMES.values()))
    raise ValueError(f"attn_implementation must be one of {allowed} for an ALiBi model, got {requested!r}")


def _set_attn_implementation_keeping_alibi(self, attn_implementation, *args, **kwargs):
    return type(self).set_attn_implementation(self, alibi_attention_name(attn_implementation), *args, **kwargs)


def keep_alibi_on_switch(model):
    """model.set_attn_implementation("eager") then selects alibi_eager (and so on), never plain attention."""
    model.set_attn_implementation = types.MethodType(_set_attn_implementation_keeping_alibi, model)
    return model


def register():
    """Make rope_type 'alibi' loadable and register the ALiBi attention + mask functions (idempotent)."""
    compat.register_rope_type(ROPE_TYPE, _rotary_off, compat.default_rope_validator())
    for name, forward, mask in (("alibi_eager", alibi_eager_forward, eager_mask),
                                ("alibi_sdpa", alibi_sdpa_forward, sdpa_mask),
                                ("alibi_flex_attention", alibi_flex_forward, flex_attention_mask),
                                ("alibi_fa2", alibi_fa2_forward, flash_attention_mask)):
        compat.register_attention(name, forward, mask)


register()


class AlibiForCausalLM:
    """The `auto_map` target: loads the config's own transformers class (importing this file made it ALiBi)."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        pass  # nothing to register: the loaded model is a plain transformers class

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        from transformers import AutoConfig

        if config is None:
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        kwargs["attn_implementation"] = alibi_attention_name(kwargs.get("attn_implementation")
                                                             or config._attn_implementation)
        model = compat.load_native_causal_lm(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        return keep_alibi_on_switch(model)
