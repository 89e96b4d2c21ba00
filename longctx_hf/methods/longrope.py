"""LongRoPE (Ding et al. 2024, arXiv 2402.13753): one rescale factor per rotary frequency, inv_i = 1 / (λ_i b^(2i/d)),
and the attention factor sqrt(1 + ln s / ln L) (transformers' default). A native transformers rope type, which
vLLM and llama.cpp also read.

`short_factor == long_factor`, always. transformers switches from short to long factors once a sequence passes
L, and it does not re-rotate the keys it has already cached; vLLM and llama.cpp pick one set statically. With one
set, every engine computes the same thing, with or without a cache. Without explicit factors, the factors are
YaRN's ramp written as per-frequency factors: λ_i = 1 / ((1 - ramp_i) + ramp_i / s). That is the seed the LongRoPE
search starts from, and it gives YaRN's frequencies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import yarn
from .base import RopeSpec, check_number, rope_inv_freq

NAME = "longrope"
ALIASES = ()
HF_ROPE_TYPE = "longrope"
KIND = "rope"
REMOTE_FILES = ()
REMOTE_CLASS = None
SAVED_ATTENTION = None
TRAINING_FREE = False


def factor_list(name: str, value, count: int) -> tuple:
    """`value` as a tuple of `count` finite floats >= 1, or a ValueError/TypeError naming `name`."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"{name} must be a list of {count} numbers (one per rotary frequency), got "
                        f"{type(value).__name__}")
    if len(value) != count:
        raise ValueError(f"{name} must have rotary_dim / 2 = {count} numbers (one per rotary frequency), got "
                         f"{len(value)}")
    numbers = []
    for index, number in enumerate(value):
        check_number(f"{name}[{index}]", number)
        if number < 1:
            raise ValueError(f"{name}[{index}] must be >= 1 (a factor below 1 extrapolates past the trained "
                             f"rotation range), got {number!r}")
        numbers.append(float(number))
    return tuple(numbers)


@dataclass(frozen=True)
class Spec(RopeSpec):
    short_factor: tuple | None = None  # default: the long factors (one behaviour in every engine)
    long_factor: tuple | None = None  # default: YaRN's ramp as per-frequency factors
    attention_factor: float | None = None  # default: sqrt(1 + ln s / ln L)

    def __post_init__(self):
        super().__post_init__()
        count = self.rotary_dim // 2
        check_number("attention_factor", self.attention_factor, greater_than=0, allow_none=True)
        long_factor = (yarn_seed(self) if self.long_factor is None
                       else factor_list("long_factor", self.long_factor, count))
        short_factor = (long_factor if self.short_factor is None
                        else factor_list("short_factor", self.short_factor, count))
        if short_factor != long_factor:
            raise ValueError("short_factor must equal long_factor: with two sets, transformers switches to the long "
                             "factors once a sequence passes the pretrained length without re-rotating the keys it "
                             "has cached (cache-inexact), and vLLM/llama.cpp pick one set statically; give one list, "
                             "or method 'dynamic_longrope' for the pretrained RoPE below that length (cache-exact)")
        object.__setattr__(self, "long_factor", long_factor)
        object.__setattr__(self, "short_factor", short_factor)

    def options(self) -> dict:
        """Always the factors: they are what the model runs with, so the record names them."""
        chosen = {"short_factor": list(self.short_factor), "long_factor": list(self.long_factor)}
        if self.attention_factor is not None:
            chosen["attention_factor"] = float(self.attention_factor)
        return chosen


def yarn_seed(spec) -> tuple:
    """YaRN's frequencies as LongRoPE factors: λ_i = 1 / ((1 - ramp_i) + ramp_i / s), so 1 (no change) for the
    fast dimensions and s (interpolation) for the slow ones."""
    ramp_spec = yarn.Spec(factor=spec.factor, rope_theta=spec.rope_theta, rotary_dim=spec.rotary_dim,
                          original_max_position_embeddings=spec.original_max_position_embeddings)
    lo, hi = yarn.correction_range(ramp_spec)
    if hi == lo:
        hi += 0.001
    ramps = [min(max((i - lo) / (hi - lo), 0.0), 1.0) for i in range(spec.rotary_dim // 2)]
    return tuple(1.0 / ((1.0 - ramp) + ramp / spec.factor) for ramp in ramps)


def attention_scaling(spec: Spec) -> float:
    if spec.attention_factor is not None:
        return float(spec.attention_factor)
    return math.sqrt(1 + math.log(spec.factor) / math.log(spec.original_max_position_embeddings))


def frequencies(spec: Spec, seq_len: int | None = None, device=None):
    """inv_i = 1 / (λ_i b^(2i/d)) at every length (one factor set)."""
    import torch

    factors = torch.tensor(spec.long_factor, dtype=torch.float64, device=device)
    inv = rope_inv_freq(spec.rope_theta, spec.rotary_dim, device).to(torch.float64) / factors
    return inv.to(torch.float32), attention_scaling(spec)


def rope_parameters(spec: Spec) -> dict:
    params = {"rope_type": "longrope", "rope_theta": spec.rope_theta, "factor": spec.factor,
              "original_max_position_embeddings": spec.original_max_position_embeddings,
              "short_factor": list(spec.short_factor), "long_factor": list(spec.long_factor)}
    if spec.attention_factor is not None:
        params["attention_factor"] = float(spec.attention_factor)
        # vLLM's longrope ignores attention_factor: it takes short_mscale/long_mscale, else recomputes the default
        # sqrt(1 + ln s / ln L), so a searched temperature would be silently dropped there. transformers reads
        # attention_factor and logs the two keys as unrecognised; Phi-3.5-MoE's config carries the same pair.
        params["short_mscale"] = params["long_mscale"] = float(spec.attention_factor)
    return params


def max_position_embeddings(spec: Spec) -> int:
    return spec.extended_length
