"""The one generic patcher: finds the rotary module(s) of any transformers RoPE decoder and extends them.

Strategy: compute the new config (pure, validated), build a fresh rotary module of the model's own class from
a copy of that config (exactly what `from_pretrained` will build on reload), check its frequencies against the
paper formula, and only then write config and buffers. Reload is therefore bit-identical by construction.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import math

import torch

from . import _compat, engines, hf_config, methods, runtimes
from .hf_config import ContextInfo

FORMULA_RTOL = 2e-6
# from_pretrained keywords that also locate or trust the config (the rest are the model's)
CONFIG_LOADING_KEYWORDS = ("revision", "subfolder", "token", "cache_dir", "local_files_only", "force_download",
                           "proxies", "trust_remote_code")  # transformers computes in float32; the paper formula here in float64


def _rotary_modules(model):
    from transformers import PreTrainedConfig, PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    found = [m for _, m in model.named_modules()
             if any(name.endswith("inv_freq") for name, _ in m.named_buffers(recurse=False))
             and isinstance(getattr(m, "config", None), PreTrainedConfig)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no rotary embedding (RoPE), so methods {', '.join(methods.METHODS)} do not "
            "apply; supported are decoders whose rotary_emb is built from config.rope_parameters "
            "(Llama, Mistral, Qwen2/3, Gemma, Phi3, OLMo, Granite, Cohere, StableLM, GPT-NeoX, ...)"
        )
    configs = {id(m.config) for m in found}
    if len(configs) != 1:
        raise ValueError("this model has rotary modules built from different configs; longctx_hf refuses it")
    return found, found[0].config


def _rotary_dim(rotary) -> int:
    """The rotary dimension of a live rotary module (per-layer-type modules name their buffers `<type>_inv_freq`)."""
    inv_freq = next(buffer for name, buffer in rotary.named_buffers(recurse=False) if name.endswith("inv_freq"))
    return 2 * inv_freq.numel()


def _fresh_rotary(rotary, config, device):
    """A rotary module of the model's own class built from `config`, as from_pretrained would build it."""
    build_device = torch.device("cpu") if device.type == "meta" else device
    with torch.device(build_device):
        return type(rotary)(config)


def extend_context(model, method, factor=None, *, target_length=None, original_max_position_embeddings=None,
                   **options):
    """Extend a loaded transformers model's context in place (returns the same model).

    `factor` is relative to the pretrained length (or give `target_length`). Re-extending replaces the previous
    extension. Everything is validated before the model is touched.
    """
    rotaries, config = _rotary_modules(model)
    module = methods.get_method(method)
    current = config.to_dict()
    if module.KIND == "attention_bias":
        return _extend_with_attention_bias(model, module, rotaries, config, factor, target_length,
                                           original_max_position_embeddings, options)
    spec, changes = hf_config.plan_extension(current, module, factor=factor, target_length=target_length,
                                             original_max_position_embeddings=original_max_position_embeddings,
                                             options=options, rotary_dim=_rotary_dim(rotaries[0]))

    new_config = copy.deepcopy(config)
    try:
        hf_config.apply_to_config(new_config, changes)
    except Exception as err:  # e.g. Phi3Config only admits rope_type 'longrope'
        raise ValueError(f"{type(config).__name__} rejects rope_type {module.HF_ROPE_TYPE!r}: {err}") from err
    if module.SAVED_ATTENTION:  # a rotary built for one attention only checks that the config names it
        _compat.set_attention_implementation(new_config, module.SAVED_ATTENTION)
    device = rotaries[0].inv_freq.device
    try:
        fresh = _fresh_rotary(rotaries[0], new_config, device)
    except ValueError:  # a rope init function refusing this model, in its own words
        raise
    except Exception as err:  # a rotary class whose constructor does not take its config alone
        raise ValueError(f"cannot rebuild {type(rotaries[0]).__name__} from its config ({err}); "
                         "this model does not follow the standard transformers RoPE layout") from err
    _check_against_formula(module, spec, fresh)
    base_attention = runtimes.current_base(model)  # before any change
    runtime = runtimes.runtime_for(module.HF_ROPE_TYPE)
    if runtime is not None:
        runtime.check_supported(model, fresh, base_attention)

    runtimes.deactivate_all(model)
    hf_config.apply_to_config(config, changes)
    for rotary in rotaries:
        _install(rotary, fresh, device)
    if runtime is not None:
        runtime.activate(model, base_attention)
    engines.warn_about_engines(hf_config.describe(config.to_dict()))
    return model


def from_pretrained(pretrained_model_name_or_path, *args, **kwargs):
    """`AutoModelForCausalLM.from_pretrained`, plus longctx_hf's runtime for what the config records.

    Plain transformers reloads every checkpoint except dynamic_yarn, dynamic_longrope and self_extend (which need
    trust_remote_code=True there); this also makes the dynamic methods decode exactly with a KV cache, as
    the saved model did.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .remote import alibi_modeling  # noqa: F401  (registers rope_type 'alibi' before its config is read)

    base = kwargs.get("attn_implementation")  # None: what the config names
    config = kwargs.pop("config", None)
    if config is None:
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **{
            key: kwargs[key] for key in CONFIG_LOADING_KEYWORDS if key in kwargs})
    loader = _own_attention_loader(config.to_dict().get("rope_parameters", {}).get("rope_type"))
    if loader is not None and not kwargs.get("trust_remote_code"):
        return loader.from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
    rotaries, config = _rotary_modules(model)
    runtime = runtimes.runtime_for(config.rope_parameters.get("rope_type"))
    if runtime is not None and not runtime.is_active(model):  # (trust_remote_code=True: the shipped code did it)
        runtime.activate(model, base)
    return model


def _own_attention_loader(rope_type):
    """The shipped `auto_map` class of a method whose rotary is built for its own attention only (SAVED_ATTENTION):
    it names that attention when loading, since transformers releases differ on whether they honour the
    attn_implementation saved in config.json."""
    for method in methods.METHODS.values():
        if method.HF_ROPE_TYPE == rope_type and method.SAVED_ATTENTION:
            module_name, class_name = method.REMOTE_CLASS.split(".")
            return getattr(importlib.import_module(f".remote.{module_name}", __package__), class_name)
    return None


def _extend_with_attention_bias(model, module, rotaries, config, factor, target_length,
                                original_max_position_embeddings, options):
    """Attention-bias methods (ALiBi): rotary turned off through its rope type, attention functions swapped.

    Same order as the RoPE path: validate everything and build the new rotary from a config copy first, then
    write config, buffers and the attention implementation.
    """
    from . import alibi_attention as attention

    spec, changes = hf_config.plan_extension(config.to_dict(), module, factor=factor, target_length=target_length,
                                             original_max_position_embeddings=original_max_position_embeddings,
                                             options=options)
    attention.check_supported(model, config)
    attn_name = attention.alibi_attention_name(runtimes.current_base(model))

    new_config = copy.deepcopy(config)
    try:
        hf_config.apply_to_config(new_config, changes)
        _compat.set_attention_implementation(new_config, attn_name)  # the rotary of rope_type alibi checks it
        fresh = _fresh_rotary(rotaries[0], new_config, rotaries[0].inv_freq.device)
    except Exception as err:
        raise ValueError(f"{type(config).__name__} cannot switch its rotary off through rope_type "
                         f"{module.HF_ROPE_TYPE!r} ({err}); ALiBi needs a standard transformers decoder") from err
    if fresh.inv_freq.count_nonzero() or float(getattr(fresh, "attention_scaling", 1.0)) != 1.0:
        raise RuntimeError(f"{type(fresh).__name__} does not turn into an identity rotary; refusing to patch")

    hf_config.apply_to_config(config, changes)
    for rotary in rotaries:
        _install(rotary, fresh, rotary.inv_freq.device)
    runtimes.deactivate_all(model)  # replacing an extension that runs a runtime
    attention.install(model, attn_name, methods.remote_code_files(module))
    return model


def _check_against_formula(module, spec, fresh):
    expected, scaling = module.frequencies(spec)
    got = fresh.inv_freq.detach().to("cpu", torch.float64)
    rel = ((got - expected.double()).abs() / expected.double()).max().item()
    fresh_scaling = float(getattr(fresh, "attention_scaling", 1.0))
    if rel > FORMULA_RTOL or not math.isclose(fresh_scaling, scaling, rel_tol=1e-9):
        raise RuntimeError(
            f"transformers builds {module.NAME} frequencies that differ from the paper formula "
            f"(max relative error {rel:.2e}, attention scaling {fresh_scaling} vs {scaling}); refusing to patch"
        )


def _install(rotary, fresh, device):
    """Copy the fresh module's buffers and plain attributes into the live one (keeps hooks and identity)."""
    for name, buffer in fresh.named_buffers(recurse=False):
        rotary._buffers[name] = buffer.to(device)  # stays float32 whatever the model dtype
    for name, value in vars(fresh).items():
        if not name.startswith("_") and name not in ("training", "config"):
            setattr(rotary, name, value)
    for name in [n for n, v in vars(rotary).items() if not n.startswith("_") and n not in vars(fresh)
                 and n not in ("training", "config") and not callable(v)]:
        delattr(rotary, name)  # lazily cached state of the previous rope type (e.g. long_inv_freq)


def context_info(model_or_config) -> ContextInfo:
    """What a model (or config / config dict) now is: method, factor, lengths, attention scaling, portability."""
    if isinstance(model_or_config, dict):
        return hf_config.describe(model_or_config)
    from transformers import PreTrainedConfig

    if isinstance(model_or_config, PreTrainedConfig):
        return hf_config.describe(model_or_config.to_dict())
    rotaries, config = _rotary_modules(model_or_config)
    info = hf_config.describe(config.to_dict())
    scaling = float(getattr(rotaries[0], "attention_scaling", 1.0))
    if runtimes.runtime_for(config.rope_parameters.get("rope_type")) is not None:
        scaling = info.attention_scaling  # the rotary module is the identity; the value at the extended length
    return dataclasses.replace(info, attention_scaling=scaling)


def alibi_model_from_config(config, max_length=None, **from_config_kwargs):
    """A freshly initialised causal LM with ALiBi instead of RoPE, for training from scratch (e.g. a LlamaConfig).

    Built by the same patcher as a loaded model, so it saves and reloads exactly like one.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, **from_config_kwargs)
    return extend_context(model, "alibi", max_length=max_length)
