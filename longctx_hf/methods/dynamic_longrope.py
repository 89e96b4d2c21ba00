"""LongRoPE factors past the pretrained length, the pretrained RoPE up to it (LongRoPE's short/long switch with
pretrained short factors), exact with a KV cache.

transformers' own longrope switches from short to long factors once a sequence passes L and keeps the keys it
cached with the short ones (cache-inexact); vLLM and llama.cpp pick one set statically. So the switch is a rope type
of its own, served by the runtime that caches keys before rotation (remote/longctx_dynamic_rope.py): every token is
computed with the frequencies of its own length, as when it was decoded — pretrained RoPE while the length is at
most L, the long factors and their attention factor past it. A prompt shorter than L is the unextended model
exactly; engines without the runtime refuse the checkpoint instead of switching without re-rotating.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import dynamic_yarn, longrope
from .base import RopeSpec, check_number, rope_inv_freq

NAME = "dynamic_longrope"
ALIASES = ()
HF_ROPE_TYPE = "dynamic_longrope"
KIND = "rope"
SAVED_ATTENTION = None
TRAINING_FREE = False
REMOTE_FILES, REMOTE_CLASS = dynamic_yarn.REMOTE_FILES, dynamic_yarn.REMOTE_CLASS  # the same runtime and files


@dataclass(frozen=True)
class Spec(RopeSpec):
    long_factor: tuple | None = None  # default: YaRN's ramp as per-frequency factors
    attention_factor: float | None = None  # default: sqrt(1 + ln s / ln L), past L only

    def __post_init__(self):
        super().__post_init__()
        check_number("attention_factor", self.attention_factor, greater_than=0, allow_none=True)
        factors = (longrope.yarn_seed(self) if self.long_factor is None
                   else longrope.factor_list("long_factor", self.long_factor, self.rotary_dim // 2))
        object.__setattr__(self, "long_factor", factors)

    def options(self) -> dict:
        chosen = {"long_factor": list(self.long_factor)}
        if self.attention_factor is not None:
            chosen["attention_factor"] = float(self.attention_factor)
        return chosen


def attention_scaling(spec: Spec) -> float:
    """The temperature past L (1 up to L): longrope's."""
    return longrope.attention_scaling(spec)


def frequencies(spec: Spec, seq_len: int | None = None, device=None):
    """(inv_freq, attention scaling) at current length `seq_len`: pretrained RoPE up to L (and for None), longrope's
    inv_i = 1 / (λ_i b^(2i/d)) with its attention factor past it."""
    if seq_len is None or seq_len <= spec.original_max_position_embeddings:
        return rope_inv_freq(spec.rope_theta, spec.rotary_dim, device), 1.0
    return longrope.frequencies(spec, device=device)


def rope_parameters(spec: Spec) -> dict:
    params = {"rope_type": HF_ROPE_TYPE, "rope_theta": spec.rope_theta, "factor": spec.factor,
              "original_max_position_embeddings": spec.original_max_position_embeddings,
              "long_factor": list(spec.long_factor)}
    if spec.attention_factor is not None:
        params["attention_factor"] = float(spec.attention_factor)
    return params


def max_position_embeddings(spec: Spec) -> int:
    # As dynamic_yarn: the length where the switch happens (what the runtime and its readers take as L).
    return spec.original_max_position_embeddings
