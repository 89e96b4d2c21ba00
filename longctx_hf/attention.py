"""Attention-bias wiring: ALiBi's attention functions, registered with transformers, installed on a model.

The functions themselves live in `remote/alibi_modeling.py` (the file copied into checkpoints), so the in-memory
model and a reloaded one run the same code. Importing this module registers them with transformers.
"""
from __future__ import annotations

import types
from pathlib import Path

from .remote.alibi_modeling import (ATTENTION_NAMES, alibi_attention_name, alibi_slopes,  # noqa: F401
                                    keep_alibi_on_switch, register)


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


def _save_with_remote_code(self, save_directory, *args, **kwargs):
    """save_pretrained, then the modeling files the config's auto_map points to (beside config.json)."""
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        for name, text in self._longctx_remote_code.items():
            (Path(save_directory) / name).write_text(text)
    return result


def install(model, attn_name: str, remote_code: dict) -> None:
    """Select the ALiBi attention function, keep it on later switches, ship the modeling code on save."""
    type(model).set_attn_implementation(model, attn_name)
    keep_alibi_on_switch(model)
    model._longctx_remote_code = dict(remote_code)
    model.save_pretrained = types.MethodType(_save_with_remote_code, model)


def alibi_model_from_config(config, max_length=None, **from_config_kwargs):
    """A freshly initialised causal LM with ALiBi instead of RoPE, for training from scratch (e.g. a LlamaConfig).

    Built by the same patcher as a loaded model, so it saves and reloads exactly like one.
    """
    from transformers import AutoModelForCausalLM

    from .patch import extend_context

    model = AutoModelForCausalLM.from_config(config, **from_config_kwargs)
    return extend_context(model, "alibi", max_length=max_length)
