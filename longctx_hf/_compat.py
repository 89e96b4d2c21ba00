"""The package's side of the one compatibility layer with transformers/torch internals.

The runtimes' touchpoints live in `remote/longctx_compat.py`, which checkpoints carry (it cannot import this
package); this module re-exports it and adds the touchpoints only the package itself uses, each with its contract.
Import it lazily: it loads torch and transformers.
"""
from __future__ import annotations

from .remote.longctx_compat import (  # noqa: F401
    TESTED_TRANSFORMERS,
    InternalsChanged,
    cache_keyword,
    caches_in,
    causal_lm_class,
    contract,
    contract_names,
    forget_results,
    output_cache,
    problem,
    require,
    routes_attention_through_interface,
    set_attention_implementation,
    unsupported_cache_layers,
)

LEGACY_ROPE_SCALING = "PreTrainedConfig.__dict__['rope_scaling']"


@contract(LEGACY_ROPE_SCALING,
          "transformers 5 turned rope_scaling into a property aliasing rope_parameters, yet to_dict() serialises "
          "the instance __dict__, so a value stored there under 'rope_scaling' is what save_pretrained writes for "
          "4.x readers, without touching rope_parameters")
def _check_legacy_rope_scaling():
    from transformers import LlamaConfig

    config = LlamaConfig(max_position_embeddings=16, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 8})
    legacy = {"type": "yarn", "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8}
    set_legacy_rope_scaling(config, legacy)
    written = config.to_dict()
    if written.get("rope_scaling") != legacy:
        return f"to_dict() wrote rope_scaling {written.get('rope_scaling')!r}"
    if written.get("rope_parameters", {}).get("rope_type") != "yarn":
        return f"rope_parameters became {written.get('rope_parameters')!r}"
    set_legacy_rope_scaling(config, None)
    if "rope_scaling" in config.to_dict() and config.to_dict()["rope_scaling"] == legacy:
        return "removing it from __dict__ did not remove it from to_dict()"
    return None


def set_legacy_rope_scaling(config, value) -> None:
    """Store (or with None, remove) the 4.x `rope_scaling` dict that save_pretrained writes beside rope_parameters."""
    if value is None:
        config.__dict__.pop("rope_scaling", None)
    else:
        config.__dict__["rope_scaling"] = value


def remove_config_attribute(config, key: str) -> None:
    """Drop a plain attribute from a config so to_dict()/save_pretrained no longer write it."""
    config.__dict__.pop(key, None)


# transformers 5.x renamed gradient checkpointing to activation checkpointing (old names deprecated, removal in v6)
def enable_activation_checkpointing(model, use_reentrant: bool = False) -> None:
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def disable_activation_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def activation_checkpointing_enabled(model) -> bool:
    if "is_activation_checkpointing" in dir(type(model)):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


# DeepSpeed's sequence parallelism (Ulysses): the group and how gradients are reduced over it
def deepspeed_sequence_parallel_group():
    """The process group that shares each sequence. Private in DeepSpeed; accelerate's data-loader adapter and
    transformers' Trainer read it from the same place."""
    from deepspeed.utils import groups

    return groups._get_sequence_parallel_group()


def deepspeed_sequence_parallel_reduction(zero_optimization: dict) -> str | None:
    """How DeepSpeed reduces gradients over the sequence-parallel group: "sum", or "mean" for ZeRO-3 before
    deepspeed 0.20.2 (deepspeedai/DeepSpeed#8854, as transformers 5.25's Trainer reads it); None where that
    release mixes the two (ZeRO-3, reduce_scatter off, contiguous_gradients on). Checked by tests/test_finetune.py
    against one process for ZeRO-3, with the deepspeed the tests install."""
    import importlib.metadata

    from packaging.version import Version

    if zero_optimization.get("stage", 0) != 3 or Version(importlib.metadata.version("deepspeed")) >= Version("0.20.2"):
        return "sum"
    if not zero_optimization.get("reduce_scatter", True) and zero_optimization.get("contiguous_gradients", True):
        return None
    return "mean"
