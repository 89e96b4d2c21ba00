"""Static NTK-aware scaling (bloc97, 2023): raise the base so the lowest frequency is interpolated by `factor`.

Portable as a plain `rope_theta` change: every engine reads it, no rope_scaling needed.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import RopeSpec, rope_inv_freq

NAME = "ntk"
ALIASES = ()
HF_ROPE_TYPE = "default"
KIND = "rope"
REMOTE_FILES = ()
REMOTE_CLASS = None
SAVED_ATTENTION = None
TRAINING_FREE = False


@dataclass(frozen=True)
class Spec(RopeSpec):
    pass


def scaled_theta(spec: Spec) -> float:
    d = spec.rotary_dim
    return spec.rope_theta * spec.factor ** (d / (d - 2))


def frequencies(spec: Spec, seq_len: int | None = None, device=None):
    return rope_inv_freq(scaled_theta(spec), spec.rotary_dim, device), 1.0


def rope_parameters(spec: Spec) -> dict:
    return {"rope_type": "default", "rope_theta": scaled_theta(spec)}


def max_position_embeddings(spec: Spec) -> int:
    return spec.extended_length


def attention_scaling(spec: Spec) -> float:
    """No attention temperature: cos and sin keep scale 1."""
    return 1.0
