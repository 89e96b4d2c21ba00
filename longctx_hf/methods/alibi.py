"""ALiBi (Press et al. 2022, arXiv 2108.12409): no rotary; each head adds -m_h * (i - j) to its attention logits.

An attention-bias method, not a RoPE rescaling: nothing is interpolated, so there is no `factor`; `max_length`
only sets the advertised context (`max_position_embeddings`). The implementation that runs is
`longctx_hf/remote/alibi_modeling.py`, which is also copied into saved checkpoints (it needs no longctx_hf).
"""
from __future__ import annotations

from dataclasses import dataclass

NAME = "alibi"
ALIASES = ()
HF_ROPE_TYPE = "alibi"
TRAINING_FREE = False
KIND = "attention_bias"  # patch.py: disable the rotary and switch attention, instead of rebuilding frequencies
REMOTE_MODULE = "alibi_modeling"
REMOTE_CLASS = f"{REMOTE_MODULE}.AlibiForCausalLM"
REMOTE_FILES = (f"{REMOTE_MODULE}.py", "longctx_compat.py")  # the first imports the second
SAVED_ATTENTION = "alibi_sdpa"  # written as config.json "attn_implementation": works on every device


@dataclass(frozen=True)
class Spec:
    rope_theta: float  # the pretrained base, kept so the record says what the model was
    original_max_position_embeddings: int
    max_length: int | None = None

    def __post_init__(self):
        for name in ("original_max_position_embeddings", "max_length"):
            value = getattr(self, name)
            if value is None and name == "max_length":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("max_length",)

    def options(self) -> dict:
        return {} if self.max_length is None else {"max_length": self.max_length}

    @property
    def extended_length(self) -> int:
        return self.max_length or self.original_max_position_embeddings

    @property
    def factor(self) -> float:
        """Advertised over pretrained length (recorded for `context_info`; ALiBi itself rescales nothing)."""
        return self.extended_length / self.original_max_position_embeddings


def slopes(num_heads: int) -> list[float]:
    """The paper's per-head slopes (what the attention functions use)."""
    from ..remote.alibi_modeling import alibi_slopes

    return alibi_slopes(num_heads)


def rope_parameters(spec: Spec) -> dict:
    return {"rope_type": HF_ROPE_TYPE, "rope_theta": spec.rope_theta}


def max_position_embeddings(spec: Spec) -> int:
    return spec.extended_length

