"""Dynamic YaRN (Peng et al. 2023, arXiv 2309.00071; jquesnelle/yarn `LlamaDynamicYaRNScaledRotaryEmbedding`):
YaRN whose scale follows the current length, s = max(1, n / L); plain RoPE up to the pretrained length.

No transformers rope type computes it, so checkpoints carry self-contained remote code (REMOTE_FILES).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import yarn
from .base import RopeSpec, rope_inv_freq

NAME = "dynamic_yarn"
ALIASES = ()
HF_ROPE_TYPE = "dynamic_yarn"
KIND = "rope"
SAVED_ATTENTION = None
TRAINING_FREE = False
REMOTE_FILES = ("longctx_dynamic_rope.py", "longctx_rope_blocks.py", "longctx_compat.py")  # the first imports the others
REMOTE_CLASS = "longctx_dynamic_rope.DynamicRopeForCausalLM"


@dataclass(frozen=True)
class Spec(RopeSpec):
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        yarn.check_betas(self.beta_fast, self.beta_slow)
        object.__setattr__(self, "beta_fast", float(self.beta_fast))
        object.__setattr__(self, "beta_slow", float(self.beta_slow))


def frequencies(spec: Spec, seq_len: int | None = None, device=None):
    """(inv_freq, attention scaling) at current length `seq_len` (the pretrained length if None)."""
    L = spec.original_max_position_embeddings
    scale = max(seq_len or L, L) / L
    if scale <= 1:
        return rope_inv_freq(spec.rope_theta, spec.rotary_dim, device), 1.0
    static = yarn.Spec(factor=scale, rope_theta=spec.rope_theta, rotary_dim=spec.rotary_dim,
                       original_max_position_embeddings=L, beta_fast=spec.beta_fast, beta_slow=spec.beta_slow)
    return yarn.frequencies(static, device=device)


def attention_scaling(spec: Spec) -> float:
    """The temperature at the extended length L·factor (it grows with the length: 1 up to L)."""
    return yarn.attention_scaling(yarn.Spec(factor=spec.factor, rope_theta=spec.rope_theta, rotary_dim=2,
                                            original_max_position_embeddings=spec.original_max_position_embeddings))


def rope_parameters(spec: Spec) -> dict:
    return {
        "rope_type": HF_ROPE_TYPE,
        "rope_theta": spec.rope_theta,
        "factor": spec.factor,
        "original_max_position_embeddings": spec.original_max_position_embeddings,
        "beta_fast": spec.beta_fast,
        "beta_slow": spec.beta_slow,
    }


def max_position_embeddings(spec: Spec) -> int:
    # Like transformers' dynamic NTK: the length where scaling starts (its dynamic_rope_update threshold).
    return spec.original_max_position_embeddings

