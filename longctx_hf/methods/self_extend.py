"""SelfExtend (Jin et al. 2024, "LLM Maybe LongLM", arXiv 2401.01325): training-free grouped attention.

RoPE itself is unchanged. For query i and key j <= i the logit uses RoPE at distance i - j inside a neighbour
window (i - j < W) and, farther away, the grouped distance floor(i/G) - floor(j/G) + (W - floor(W/G)), so every
distance the model sees stays inside its pretrained range. Reach: G * (L - W + floor(W/G)) tokens (the paper's
(L - W) * G + W when G divides W).

Default choice when only factor / target length is given: W = L // 4 (the paper's windows are 1/4 to 1/2 of L),
then the smallest G >= 2 whose reach covers the target. The attention that runs is
`longctx_hf/remote/longctx_self_extend.py`, copied into saved checkpoints (it needs no longctx_hf).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .base import RopeSpec, rope_inv_freq

NAME = "self_extend"
ALIASES = ("selfextend",)
HF_ROPE_TYPE = "self_extend"
KIND = "rope"
# self_extend imports dynamic_rope, which imports the other two
REMOTE_FILES = ("longctx_self_extend.py", "longctx_dynamic_rope.py", "longctx_rope_blocks.py", "longctx_compat.py")
REMOTE_CLASS = "longctx_self_extend.SelfExtendForCausalLM"
TRAINING_FREE = True  # finetune refuses it: the explicit attention path that autograd needs is O(n^2) in memory
SAVED_ATTENTION = "longctx_self_extend"  # a plain load without the runtime fails loudly instead of running plain RoPE


def reach(pretrained_length: int, group_size: int, window: int) -> int:
    """The longest sequence whose every distance stays inside the trained range 0..L-1: G * (L - W + floor(W/G)).

    The largest distance in n tokens is floor((n-1)/G) + W - floor(W/G) (last query, first key); it is <= L - 1
    exactly while n <= G * (L - W + floor(W/G)). The paper's (L - W) * G + W is this when G divides W, and one
    group more (reaching distance L, never trained) when it does not."""
    return group_size * (pretrained_length - window + window // group_size)


def default_window(pretrained_length: int) -> int:
    return max(1, pretrained_length // 4)


def default_group_size(pretrained_length: int, window: int, target_length: int) -> int:
    """The smallest group size >= 2 whose reach covers `target_length`."""
    group_size = max(2, math.ceil((target_length - window) / (pretrained_length - window)))
    while reach(pretrained_length, group_size, window) < target_length:
        group_size += 1
    return group_size


def _check_int(name, value, lowest):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < lowest:
        raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")


@dataclass(frozen=True)
class Spec(RopeSpec):
    group_size: int | None = None  # G; default: the smallest that reaches L * factor with the window below
    window: int | None = None  # W, the neighbour window; default: L // 4

    def __post_init__(self):
        super().__post_init__()
        L = self.original_max_position_embeddings
        if self.window is None:
            object.__setattr__(self, "window", default_window(L))
        _check_int("window", self.window, 1)
        if self.window >= L:
            raise ValueError(f"window must be smaller than the pretrained length {L} (neighbour distances up to "
                             f"window - 1 must have been trained), got {self.window}")
        if self.group_size is None:
            object.__setattr__(self, "group_size", default_group_size(L, self.window, self.extended_length))
        _check_int("group_size", self.group_size, 2)
        covered = reach(L, self.group_size, self.window)
        if covered < self.extended_length:
            raise ValueError(
                f"group_size={self.group_size} and window={self.window} reach G * (L - W + W // G) = {covered} tokens, "
                f"less than the target {self.extended_length} (L = {L}); raise group_size or lower window")

    def options(self) -> dict:
        """Always both: the resolved G and W are what the model runs with, so the record names them."""
        return {"group_size": self.group_size, "window": self.window}


def frequencies(spec: Spec, seq_len: int | None = None, device=None):
    """Plain RoPE: SelfExtend changes which positions meet, not the frequencies."""
    return rope_inv_freq(spec.rope_theta, spec.rotary_dim, device), 1.0


def grouped_distance(i: int, j: int, group_size: int, window: int) -> int:
    """The RoPE distance SelfExtend gives query i and key j <= i (the paper's definition, for tests and docs)."""
    if i - j < window:
        return i - j
    return i // group_size - j // group_size + (window - window // group_size)


def rope_parameters(spec: Spec) -> dict:
    """No `factor` key: vLLM multiplies max_position_embeddings (already the extended length) by any factor of a
    rope type it does not know, and would derive twice the reach. The factor is in the longctx_hf record."""
    pretrained = {"rope_theta": spec.rope_theta, "original_max_position_embeddings": spec.original_max_position_embeddings}
    return {"rope_type": HF_ROPE_TYPE, **pretrained, **spec.options()}


def max_position_embeddings(spec: Spec) -> int:
    return spec.extended_length


def attention_scaling(spec: Spec) -> float:
    """No attention temperature: cos and sin keep scale 1."""
    return 1.0
