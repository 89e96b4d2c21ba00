"""Dynamic NTK (emozilla, 2023): plain RoPE up to the pretrained length, NTK base grown with the current length."""
from __future__ import annotations

from dataclasses import dataclass

from .base import RopeSpec, rope_inv_freq

NAME = "dynamic_ntk"
ALIASES = ("dynamic",)
HF_ROPE_TYPE = "dynamic"
KIND = "rope"
REMOTE_FILES = ()
REMOTE_CLASS = None
SAVED_ATTENTION = None
TRAINING_FREE = False


@dataclass(frozen=True)
class Spec(RopeSpec):
    pass


def theta_at(spec: Spec, seq_len: int | None) -> float:
    L, s, d = spec.original_max_position_embeddings, spec.factor, spec.rotary_dim
    n = max(seq_len or L, L)
    return spec.rope_theta * ((s * n / L) - (s - 1)) ** (d / (d - 2))


def frequencies(spec: Spec, seq_len: int | None = None, device=None):
    return rope_inv_freq(theta_at(spec, seq_len), spec.rotary_dim, device), 1.0


def rope_parameters(spec: Spec) -> dict:
    return {"rope_type": "dynamic", "rope_theta": spec.rope_theta, "factor": spec.factor}


def max_position_embeddings(spec: Spec) -> int:
    # transformers uses max_position_embeddings as the pretrained length (the point where scaling starts).
    return spec.original_max_position_embeddings


def attention_scaling(spec: Spec) -> float:
    """No attention temperature: cos and sin keep scale 1."""
    return 1.0
