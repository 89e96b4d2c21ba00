"""Shared pieces of every RoPE method: the pretrained rotary setup and its validation.

Kept free of a top-level torch import so that config-only paths (the CLI's `info`) stay fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Real


def check_number(name: str, value, *, greater_than: float | None = None, allow_none: bool = False):
    """Raise a TypeError/ValueError naming `name` unless `value` is a finite real number above `greater_than`."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if greater_than is not None and not value > greater_than:
        raise ValueError(f"{name} must be > {greater_than:g}, got {value!r}")


@dataclass(frozen=True)
class RopeSpec:
    """The pretrained rotary setup plus the extension factor; each method subclasses it with its options."""

    factor: float
    rope_theta: float
    rotary_dim: int
    original_max_position_embeddings: int

    def __post_init__(self):
        check_number("factor", self.factor, greater_than=1)
        check_number("rope_theta", self.rope_theta, greater_than=1)
        for name in ("rotary_dim", "original_max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even, got {self.rotary_dim}")
        object.__setattr__(self, "factor", float(self.factor))
        object.__setattr__(self, "rope_theta", float(self.rope_theta))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The method-specific keyword options (everything beyond the base fields)."""
        base = {f.name for f in fields(RopeSpec)}
        return tuple(f.name for f in fields(cls) if f.name not in base)

    def options(self) -> dict:
        """Method options that differ from their defaults (what a user actually chose)."""
        chosen = {}
        for f in fields(self):
            if f.name in self.option_names() and getattr(self, f.name) != f.default:
                chosen[f.name] = getattr(self, f.name)
        return chosen

    @property
    def extended_length(self) -> int:
        return int(round(self.original_max_position_embeddings * self.factor))


def rope_inv_freq(theta: float, rotary_dim: int, device=None):
    """Plain RoPE inverse frequencies theta^(-2i/d), computed in float64 then cast to float32."""
    import torch

    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim
    return (1.0 / (float(theta) ** exponents)).to(torch.float32)


def remote_source(file_name: str) -> str:
    """The text of a self-contained modeling file in longctx_hf/remote/, as it is shipped beside config.json."""
    from pathlib import Path

    return (Path(__file__).resolve().parent.parent / "remote" / file_name).read_text(encoding="utf-8")
