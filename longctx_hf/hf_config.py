"""Every transformers-version and engine-portability quirk of reading and writing RoPE config, in one place.

Works on plain config dicts (config.json or `config.to_dict()`), so it needs neither torch nor transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import methods

RECORD_KEY = "longctx_hf"  # top-level config key recording the pretrained setup, so re-extension replaces
DELETE = object()  # marker in a change set: remove this key
SCALED_RECOVERABLE = {"yarn"}  # foreign rope types whose pretrained length the config itself records
DEFAULT_THETA = 10000.0


@dataclass(frozen=True)
class Pretrained:
    rope_theta: float
    max_position_embeddings: int


def rope_parameters_of(config: dict) -> dict:
    """The flat RoPE parameters of a config dict, reading the transformers 5 or the 4.x form."""
    rope = config.get("rope_parameters")
    if rope is None:
        rope = dict(config.get("rope_scaling") or {})
        rope.setdefault("rope_type", rope.get("type", "default"))
        rope.setdefault("rope_theta", config.get("rope_theta", DEFAULT_THETA))
    else:
        rope = dict(rope)
    layer_types = set(config.get("layer_types") or ()) | {"full_attention", "sliding_attention"}
    nested = sorted(k for k, v in rope.items() if k in layer_types and isinstance(v, dict))
    if nested:
        raise ValueError(
            f"this model uses a different RoPE per layer type ({', '.join(nested)}); extending only some of them "
            "changes the model in ways no paper describes, so longctx_hf refuses models with nested rope_parameters"
        )
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def pretrained_rope(config: dict, original_max_position_embeddings=None) -> Pretrained:
    """The model's pretrained base and length: an explicit length wins, then our record, then the config."""
    record = config.get(RECORD_KEY)
    rope = rope_parameters_of(config)
    if record:
        theta, length = record["original_rope_theta"], record["original_max_position_embeddings"]
    elif rope["rope_type"] == "default":
        theta, length = rope.get("rope_theta", DEFAULT_THETA), config.get("max_position_embeddings")
    elif rope["rope_type"] in SCALED_RECOVERABLE:
        theta = rope["rope_theta"]
        length = rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    elif rope["rope_type"] in ("linear", "dynamic") and original_max_position_embeddings is not None:
        theta, length = rope["rope_theta"], None
    else:
        raise ValueError(
            f"this model already uses rope_type {rope['rope_type']!r} and its config does not say which length it was "
            "pretrained with; pass original_max_position_embeddings=<pretrained length> to replace it"
            if rope["rope_type"] in ("linear", "dynamic")
            else f"this model already uses rope_type {rope['rope_type']!r} from its own training; extending it again "
            "is not supported (only 'default' RoPE, or yarn/linear/dynamic configs, can be replaced)"
        )
    if original_max_position_embeddings is not None:
        length = original_max_position_embeddings
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"original_max_position_embeddings must be an int, got {length!r}")
    if length <= 0:
        raise ValueError(f"original_max_position_embeddings must be a positive int, got {length!r}")
    return Pretrained(rope_theta=float(theta), max_position_embeddings=length)


def legacy_rope_scaling(rope_parameters: dict):
    """The transformers 4.x / vLLM / llama.cpp form of a rope config (`rope_scaling`, with `type` for old readers)."""
    if rope_parameters["rope_type"] == "default":
        return None
    scaling = {k: v for k, v in rope_parameters.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
    scaling["type"] = rope_parameters["rope_type"]
    return scaling


def config_changes(config: dict, method, spec, pretrained: Pretrained) -> dict:
    """Top-level config keys to set (or DELETE) so every reader sees the extension the same way."""
    rope = method.rope_parameters(spec)
    partial = rope_parameters_of(config).get("partial_rotary_factor")
    if partial is not None:
        rope["partial_rotary_factor"] = partial
    changes = {
        "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],  # transformers 4.x falls back to 10000 without it
        "rope_scaling": legacy_rope_scaling(rope) or DELETE,
        "max_position_embeddings": method.max_position_embeddings(spec),
        RECORD_KEY: {
            "method": method.NAME,
            "factor": spec.factor,
            "original_max_position_embeddings": pretrained.max_position_embeddings,
            "original_rope_theta": pretrained.rope_theta,
            "options": spec.options(),
        },
    }
    changes.update(_auto_map_changes(config, method, spec))
    if "head_dim" in config and config["head_dim"] is None and config.get("num_attention_heads"):
        # transformers' yarn/dynamic read `getattr(config, "head_dim", default)`, which an explicit None defeats.
        changes["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    if "original_max_position_embeddings" in config:
        # Phi3-style configs: transformers 5 gives this top-level key priority over rope_parameters.
        changes["original_max_position_embeddings"] = pretrained.max_position_embeddings
    return changes


def _auto_map_changes(config: dict, method, spec) -> dict:
    """Point `auto_map` at the method's remote code, or drop entries an earlier extension of ours wrote."""
    ours = {module.REMOTE_CLASS for module in methods.METHODS.values() if hasattr(module, "REMOTE_CLASS")}
    current = dict(config.get("auto_map") or {})
    kept = {key: value for key, value in current.items() if value not in ours}
    wanted = {**kept, **(method.auto_map(spec) if hasattr(method, "auto_map") else {})}
    if wanted == current:
        return {}
    return {"auto_map": wanted or DELETE}


def apply_to_dict(config: dict, changes: dict) -> dict:
    out = dict(config)
    for key, value in changes.items():
        if value is DELETE:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def apply_to_config(config, changes: dict) -> None:
    """Apply a change set to a transformers config object, so `save_pretrained` writes every portable key."""
    for key, value in changes.items():
        if key == "rope_scaling":
            # `rope_scaling` is a deprecated property aliasing rope_parameters in transformers 5; `to_dict`
            # serialises the instance __dict__, so the 4.x form is stored there directly.
            if value is DELETE:
                config.__dict__.pop("rope_scaling", None)
            else:
                config.__dict__["rope_scaling"] = value
        elif value is DELETE:
            config.__dict__.pop(key, None)
        else:
            setattr(config, key, value)


@dataclass(frozen=True)
class ContextInfo:
    method: str
    factor: float
    pretrained_length: int | None
    extended_length: int | None
    attention_scaling: float
    rope_theta: float | None
    options: dict = field(default_factory=dict)
    loads_with_plain_transformers: bool = True
    warnings: tuple = ()


RUNTIME_NAMES = {"default": "none", "linear": "pi", "dynamic": "dynamic_ntk", "yarn": "yarn"}


def _temperature(method, factor, rope_theta, original_length, options) -> float:
    """A method's attention scaling from config values alone (the rotary dim does not enter it)."""
    if not hasattr(method, "attention_scaling"):
        return 1.0
    spec = method.Spec(factor=factor, rope_theta=rope_theta, rotary_dim=2,
                       original_max_position_embeddings=original_length, **options)
    return method.attention_scaling(spec)


def describe(config: dict) -> ContextInfo:
    """What a config dict says the model is, plus warnings for readers that would see it differently."""
    if not any(key in config for key in ("rope_parameters", "rope_scaling", "rope_theta")):
        return ContextInfo("no-rope", 1.0, None, config.get("max_position_embeddings"), 1.0, None)
    try:
        rope = rope_parameters_of(config)
    except ValueError as err:
        return ContextInfo("per-layer-rope", 1.0, config.get("max_position_embeddings"), None, 1.0, None,
                           warnings=(str(err),))
    record = config.get(RECORD_KEY)
    warnings = []
    if "rope_parameters" in config and "rope_theta" not in config:
        warnings.append("no top-level rope_theta: transformers 4.x would use 10000 instead of "
                        f"{rope.get('rope_theta')}")
    if rope["rope_type"] != "default" and not config.get("rope_scaling"):
        warnings.append(f"no top-level rope_scaling: transformers 4.x and vLLM would not apply {rope['rope_type']!r}")
    if rope["rope_type"] == "yarn":
        for key in ("original_max_position_embeddings", "beta_fast", "beta_slow"):
            if key not in rope:
                warnings.append(f"yarn without {key}: engines disagree on its default")
        if "attention_factor" in rope:
            warnings.append("explicit attention_factor: transformers uses it instead of 0.1*ln(s)+1, "
                            "vLLM and llama.cpp multiply the two")
    if record:
        method = methods.get_method(record["method"])
        factor, theta = float(record["factor"]), float(record["original_rope_theta"])
        original, options = record["original_max_position_embeddings"], dict(record.get("options", {}))
    else:
        method = methods.METHODS.get(RUNTIME_NAMES.get(rope["rope_type"], ""))
        factor, theta = float(rope.get("factor", 1.0)), rope.get("rope_theta")
        original = rope.get("original_max_position_embeddings", config.get("max_position_embeddings"))
        options = {k: rope[k] for k in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim")
                   if rope.get(k) is not None} if rope["rope_type"] == "yarn" else {}
    scaling = _temperature(method, factor, theta, original, options) if method and factor > 1 else 1.0
    extended = int(round(original * factor)) if original else None
    name = method.NAME if method else RUNTIME_NAMES.get(rope["rope_type"], rope["rope_type"])
    plain = rope["rope_type"] in RUNTIME_NAMES or (not record and rope["rope_type"] in ("llama3", "longrope"))
    return ContextInfo(name, factor, original, extended, scaling, theta, options if record else {}, plain,
                       tuple(warnings))
