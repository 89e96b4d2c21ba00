"""Position Interpolation (Chen et al. 2023, arXiv 2306.15595): every frequency divided by the factor."""
from __future__ import annotations

from dataclasses import dataclass

from .base import RopeSpec, rope_inv_freq

NAME = "pi"
ALIASES = ("linear",)
HF_ROPE_TYPE = "linear"
KIND = "rope"
REMOTE_FILES = ()
REMOTE_CLASS = None
SAVED_ATTENTION = None
TRAINING_FREE = False


@dataclass(frozen=True)
class Spec(RopeSpec):
    pass


def frequencies(spec: Spec, seq_len: int | None = None, device=None):
    return rope_inv_freq(spec.rope_theta, spec.rotary_dim, device) / spec.factor, 1.0


def rope_parameters(spec: Spec) -> dict:
    return {"rope_type": "linear", "rope_theta": spec.rope_theta, "factor": spec.factor}


def max_position_embeddings(spec: Spec) -> int:
    # vLLM multiplies max_position_embeddings by `factor` for linear scaling: keep the pretrained length.
    return spec.original_max_position_embeddings


def attention_scaling(spec: Spec) -> float:
    """No attention temperature: cos and sin keep scale 1."""
    return 1.0
