"""ALiBi's attention functions installed on a model (the patcher's attention-bias path).

The functions themselves live in `remote/alibi_modeling.py` (the file copied into checkpoints), so the in-memory
model and a reloaded one run the same code (importing it registers them with transformers).
"""
from __future__ import annotations

from .remote.alibi_modeling import alibi_attention_name, keep_alibi_on_switch  # noqa: F401  (patch.py uses the first)
from .remote.longctx_dynamic_rope import save_remote_code_with


def check_supported(model, config) -> None:
    """Refuse (before any change) models where swapping the attention function would not give ALiBi."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder; ALiBi here supports causal decoders only")
    if not isinstance(getattr(config, "num_attention_heads", None), int):
        raise ValueError(f"{type(config).__name__} has no num_attention_heads; ALiBi needs standard attention")
    from . import _compat

    _compat.require("PreTrainedModel._can_set_attn_implementation")
    if not _compat.routes_attention_through_interface(type(model)):
        raise ValueError(f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
                         "so ALiBi's attention functions would never run; supported are standard decoders "
                         "(Llama, Mistral, Qwen2, ...)")
    for key in ("attn_logit_softcapping", "sliding_window_pattern"):
        if getattr(config, key, None):
            raise ValueError(f"{type(config).__name__} sets {key}; ALiBi here supports plain causal attention only")
    if not any(getattr(m, "is_causal", False) and hasattr(m, "layer_idx") for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no causal attention modules; ALiBi needs a decoder")


def install(model, attn_name: str, remote_code: dict) -> None:
    """Select the ALiBi attention function, keep it on later switches, ship the modeling code on save."""
    type(model).set_attn_implementation(model, attn_name)
    keep_alibi_on_switch(model)
    save_remote_code_with(model, remote_code)
