"""YaRN (Peng et al. 2023, arXiv 2309.00071): wavelength-aware blend of interpolation and extrapolation,
plus an attention temperature applied to cos and sin."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .base import RopeSpec, check_number, rope_inv_freq

NAME = "yarn"
ALIASES = ()
HF_ROPE_TYPE = "yarn"
KIND = "rope"
REMOTE_FILES = ()
REMOTE_CLASS = None
SAVED_ATTENTION = None
TRAINING_FREE = False


@dataclass(frozen=True)
class Spec(RopeSpec):
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None

    def __post_init__(self):
        super().__post_init__()
        check_betas(self.beta_fast, self.beta_slow)
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            check_number(name, getattr(self, name), greater_than=0, allow_none=True)
        if (self.mscale is None) != (self.mscale_all_dim is None):
            raise ValueError("mscale and mscale_all_dim must be given together (DeepSeek-style temperature), or neither")
        if self.attention_factor is not None and self.mscale is not None:
            raise ValueError("give either attention_factor or mscale/mscale_all_dim, not both")
        object.__setattr__(self, "beta_fast", float(self.beta_fast))
        object.__setattr__(self, "beta_slow", float(self.beta_slow))


def check_betas(beta_fast, beta_slow) -> None:
    """The ramp's wavelength bounds (rotations per context): positive, beta_fast above beta_slow."""
    check_number("beta_fast", beta_fast, greater_than=0)
    check_number("beta_slow", beta_slow, greater_than=0)
    if not beta_fast > beta_slow:
        raise ValueError(f"beta_fast must be > beta_slow, got beta_fast={beta_fast}, beta_slow={beta_slow}")


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_scaling(spec: Spec) -> float:
    """The temperature multiplying cos and sin (attention logits scale by its square)."""
    if spec.attention_factor is not None:
        return float(spec.attention_factor)
    if spec.mscale is not None:
        return _mscale(spec.factor, spec.mscale) / _mscale(spec.factor, spec.mscale_all_dim)
    return _mscale(spec.factor)


def correction_range(spec: Spec) -> tuple[float, float]:
    """Rotary-dimension bounds [lo, hi] between full extrapolation (fast) and full interpolation (slow)."""
    d, b, L = spec.rotary_dim, spec.rope_theta, spec.original_max_position_embeddings

    def dim_for(rotations: float) -> float:
        return d * math.log(L / (2 * math.pi * rotations)) / (2 * math.log(b))

    lo = max(math.floor(dim_for(spec.beta_fast)), 0)
    hi = min(math.ceil(dim_for(spec.beta_slow)), d - 1)
    return lo, hi


def frequencies(spec: Spec, seq_len: int | None = None, device=None):
    import torch

    inv = rope_inv_freq(spec.rope_theta, spec.rotary_dim, device).to(torch.float64)
    lo, hi = correction_range(spec)
    if hi == lo:
        hi += 0.001  # the reference implementation's guard against a zero-width ramp
    i = torch.arange(spec.rotary_dim // 2, dtype=torch.float64, device=device)
    ramp = ((i - lo) / (hi - lo)).clamp(0, 1)
    blended = inv / spec.factor * ramp + inv * (1 - ramp)
    return blended.to(torch.float32), attention_scaling(spec)


def rope_parameters(spec: Spec) -> dict:
    params = {
        "rope_type": "yarn",
        "rope_theta": spec.rope_theta,
        "factor": spec.factor,
        "original_max_position_embeddings": spec.original_max_position_embeddings,
        "beta_fast": spec.beta_fast,
        "beta_slow": spec.beta_slow,
    }
    for name in ("attention_factor", "mscale", "mscale_all_dim"):
        if getattr(spec, name) is not None:
            params[name] = float(getattr(spec, name))
    return params


def max_position_embeddings(spec: Spec) -> int:
    return spec.extended_length
