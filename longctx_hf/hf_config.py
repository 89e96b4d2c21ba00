"""Every transformers-version and engine-portability quirk of reading and writing RoPE config, in one place.

Works on plain config dicts (config.json or `config.to_dict()`), so it needs neither torch nor transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import engines, methods

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
        rope.setdefault("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", DEFAULT_THETA)))
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


HEAD_DIM_KEYS = ("head_dim", "kv_channels", "attention_head_dim")  # config classes' attribute_map aliases
# transformers' config-class defaults (configuration_*.py, "assign default for BC") for a config.json without one
PARTIAL_ROTARY_DEFAULTS = {"gpt_neox": 0.25, "stablelm": 0.25, "phi": 0.5, "persimmon": 0.5, "nemotron": 0.5,
                           "glm": 0.5, "glm4": 0.5, "glm4_moe": 0.5, "glm4v_moe_text": 0.5, "bamba": 0.5,
                           "recurrent_gemma": 0.5, "qwen3_next": 0.25, "qwen3_5_text": 0.25, "qwen3_5_moe_text": 0.25}
# Text models whose rotary dimension is head_dim x partial factor (with the defaults above), checked against
# transformers' own rotary class for each (tests/test_checkpoint.py). Any other model_type is refused: its rotary
# dimension may come from other keys (qk_rope_head_dim, rotary_dim, ...) or from code.
HEAD_DIM_ROTARY_MODELS = frozenset({
    "afmoe", "apertus", "arcee", "aria_text", "bamba", "bitnet", "chameleon", "cohere", "cohere2", "cohere2_moe",
    "csm", "cwm", "diffllama", "doge", "dots1", "emu3_text_model", "ernie4_5", "ernie4_5_moe", "exaone4",
    "exaone_moe", "falcon", "falcon_h1", "flex_olmo", "flint", "gemma", "gemma2", "glm", "glm4", "glm4_moe",
    "glm4v_moe_text", "glm4v_text", "glm_image_text", "glm_ocr_text", "gpt_neox", "gpt_neox_japanese", "gpt_oss",
    "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "helium",
    "hunyuan_v1_dense", "hunyuan_v1_moe", "hy_v3", "hyperclovax", "jais2", "jetmoe", "kolibri1", "lfm2", "lfm2_moe",
    "llama", "llama4_text", "minimax", "minimax_m2", "ministral", "ministral3", "mistral", "mixtral",
    "mllama_text_model", "moshi", "nanochat", "nemotron", "olmo", "olmo2", "olmo_hybrid", "olmoe", "persimmon",
    "phi", "phi3", "phimoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_moe",
    "qwen3_next", "qwen4_exp_text", "recurrent_gemma", "seed_oss", "smollm3", "solar_open", "stablelm",
    "starcoder2", "vaultgemma"
})
ROTARY_DIM_KEYS = ("qk_rope_head_dim", "rotary_dim", "rope_dim", "rotary_emb_dim", "rope_head_dim")


def partial_rotary_factor_of(config: dict):
    """The fraction of head_dim that rotates, as transformers 5 reads it (None: the whole head), from
    rope_parameters, the 4.x top-level key, GPT-NeoX's `rotary_pct`, or the config class default."""
    partial = rope_parameters_of(config).get("partial_rotary_factor")
    for key in ("partial_rotary_factor", "rotary_pct"):
        if partial is None:
            partial = config.get(key)
    return PARTIAL_ROTARY_DEFAULTS.get(config.get("model_type")) if partial is None else partial


def rotary_dim_of(config: dict) -> int:
    """The rotary dimension transformers builds for a config.json dict, without transformers.

    head_dim (or hidden_size / num_attention_heads) times the partial rotary factor, rounded up to even like
    `arange(0, dim, 2)`. Refused (ValueError) for a model_type not known to work that way: a wrong rotary
    dimension would silently give wrong yarn/ntk frequencies.
    """
    model_type = config.get("model_type")
    other_keys = [key for key in ROTARY_DIM_KEYS if key in config]
    if model_type not in HEAD_DIM_ROTARY_MODELS or other_keys:
        why = f" (it sets {', '.join(other_keys)})" if other_keys else ""
        raise ValueError(f"cannot determine the rotary dimension of model_type {model_type!r} from config.json "
                         f"alone{why}; load the model and use extend_context")
    head_dim = next((config[key] for key in HEAD_DIM_KEYS if config.get(key)), None)
    if not head_dim:
        hidden = next((config[key] for key in ("hidden_size", "n_embd", "d_model") if config.get(key)), None)
        heads = next((config[key] for key in ("num_attention_heads", "n_head", "num_heads") if config.get(key)), None)
        if not hidden or not heads:
            raise ValueError("config.json has neither head_dim nor hidden_size and num_attention_heads, so the rotary "
                             "dimension is unknown; load the model and use extend_context instead")
        head_dim = hidden // heads
    partial = partial_rotary_factor_of(config)
    dim = int(head_dim * (1.0 if partial is None else partial))
    return 2 * ((dim + 1) // 2)


def plan_extension(config: dict, method, *, factor, target_length, original_max_position_embeddings, options: dict,
                   rotary_dim: int | None = None):
    """The validated Spec and config change set for extending `config` with `method` (a method module).

    One function for the in-memory patcher and the offline checkpoint rewriter, so both write the same config.
    `rotary_dim` is the live model's when known; otherwise it is read from the config (RoPE methods only).
    """
    pretrained = pretrained_rope(config, original_max_position_embeddings)
    if method.KIND == "attention_bias":
        if factor is not None or target_length is not None:
            raise ValueError(f"factor/target_length are not used by method {method.NAME!r} (it extrapolates without "
                             "rescaling anything); give max_length=<tokens> to set the advertised context")
        methods.check_options(method, options)
        spec = method.Spec(rope_theta=pretrained.rope_theta,
                           original_max_position_embeddings=pretrained.max_position_embeddings, **options)
    else:
        if rope_parameters_of(config)["rope_type"] == "alibi":
            raise ValueError(f"this model uses ALiBi (no rotary), so method {method.NAME!r} does not apply; ALiBi "
                             "extrapolates as it is: extend_context(model, 'alibi', max_length=...) sets its length")
        factor = factor_from(factor, target_length, pretrained.max_position_embeddings)
        spec = methods.build_spec(method, factor=factor, rope_theta=pretrained.rope_theta,
                                  rotary_dim=rotary_dim if rotary_dim is not None else rotary_dim_of(config),
                                  original_max_position_embeddings=pretrained.max_position_embeddings,
                                  options=options)
    return spec, config_changes(config, method, spec, pretrained)


def factor_from(factor, target_length, pretrained_length: int) -> float:
    """The factor relative to the pretrained length, from exactly one of `factor` or `target_length`."""
    if (factor is None) == (target_length is None):
        raise ValueError("give exactly one of factor (> 1, relative to the pretrained context) or target_length")
    if target_length is not None:
        if isinstance(target_length, bool) or not isinstance(target_length, int):
            raise TypeError(f"target_length must be an int, got {type(target_length).__name__} {target_length!r}")
        if target_length <= pretrained_length:
            raise ValueError(f"target_length must exceed the pretrained length {pretrained_length}, got {target_length}")
        return target_length / pretrained_length
    return factor


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
    partial = partial_rotary_factor_of(config)
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
    if method.SAVED_ATTENTION:  # read back by from_pretrained as the attention implementation
        changes["attn_implementation"] = method.SAVED_ATTENTION
    elif config.get("attn_implementation") in {m.SAVED_ATTENTION for m in methods.METHODS.values()
                                               if m.SAVED_ATTENTION}:
        changes["attn_implementation"] = DELETE  # written by the extension this one replaces
    if "head_dim" in config and config["head_dim"] is None and config.get("num_attention_heads"):
        # transformers' yarn/dynamic read `getattr(config, "head_dim", default)`, which an explicit None defeats.
        changes["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    if "rotary_emb_base" in config:
        # GPT-NeoX configs written by transformers 4.x: their reader takes the base from this key.
        changes["rotary_emb_base"] = rope["rope_theta"]
    if "original_max_position_embeddings" in config:
        # Phi3-style configs: transformers 5 gives this top-level key priority over rope_parameters.
        changes["original_max_position_embeddings"] = pretrained.max_position_embeddings
    return changes


def _auto_map_changes(config: dict, method, spec) -> dict:
    """Point `auto_map` at the method's remote code, or drop entries an earlier extension of ours wrote."""
    ours = {module.REMOTE_CLASS for module in methods.METHODS.values() if module.REMOTE_CLASS}
    current = dict(config.get("auto_map") or {})
    kept = {key: value for key, value in current.items() if value not in ours}
    wanted = {**kept, **methods.auto_map(method)}
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
    from . import _compat

    _compat.require(_compat.LEGACY_ROPE_SCALING)
    for key, value in changes.items():
        if key == "rope_scaling":  # the 4.x form, beside rope_parameters (see _compat)
            _compat.set_legacy_rope_scaling(config, None if value is DELETE else value)
        elif value is DELETE:
            _compat.remove_config_attribute(config, key)
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
    pretrained_rope_theta: float | None = None  # rope_theta before the extension (ntk changes it)
    engines: dict = field(default_factory=dict)  # {serving engine: "same" | "refuses" | "different"} (engines.py)


RUNTIME_NAMES = {"default": "none", "linear": "pi", "dynamic": "dynamic_ntk", "yarn": "yarn"}


def _temperature(method, factor, rope_theta, original_length, options) -> float:
    """A method's attention scaling from config values alone (the rotary dim does not enter it, but per-frequency
    factor lists must match it)."""
    if method.KIND != "rope":
        return 1.0
    rotary_dim = 2 * len(options["long_factor"]) if "long_factor" in options else 2
    spec = method.Spec(factor=factor, rope_theta=rope_theta, rotary_dim=rotary_dim,
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
    plain = rope["rope_type"] in RUNTIME_NAMES or rope["rope_type"] == "longrope" or (
        not record and rope["rope_type"] == "llama3")
    verdicts, engine_warnings = engines.engine_notes(name, factor, options)
    return ContextInfo(name, factor, original, extended, scaling, rope.get("rope_theta"), options if record else {},
                       plain, tuple(warnings + engine_warnings), pretrained_rope_theta=theta, engines=verdicts)
