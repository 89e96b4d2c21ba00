"""Every place where longctx_hf's runtimes touch a private or unstable transformers / torch internal, in one file.

Self-contained (torch + transformers only) and shipped in checkpoints beside the runtime files, so the package and a
checkpoint loaded without it run the same code. Each touchpoint has a *contract*: a cheap check of exactly the
behaviour the runtimes rely on. `require(...)` runs the named contracts (once per process) and raises
`InternalsChanged`, naming the internal, the installed version and the tested range, before a model is changed.
So a transformers release newer than the tested ones is served while its contracts hold, and refused loudly when
one breaks, never run with results that silently differ.
"""
from __future__ import annotations

import inspect
import math
import sys
import warnings

import torch
import transformers
from packaging.version import Version  # a transformers dependency
from transformers.cache_utils import Cache

TESTED_TRANSFORMERS = ("5.0.0", "5.25.0")  # the lowest and the newest release the whole suite runs on
RUNTIME_VERSION = "3"  # of the shipped runtime files as a set; raise it whenever their behaviour changes
# Cache layer classes whose keys are the tokens seen so far, in order (what "keys cached before rotation" needs)
DYNAMIC_CACHE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


class InternalsChanged(RuntimeError):
    """A transformers/torch internal that longctx_hf relies on no longer behaves as its contract says."""

    def __init__(self, internal: str, relies_on: str, detail: str):
        self.internal = internal
        low, high = TESTED_TRANSFORMERS
        super().__init__(
            f"longctx_hf relies on the transformers internal {internal} ({relies_on}), and the installed "
            f"transformers {transformers.__version__} (torch {torch.__version__}) no longer provides it: {detail}. "
            f"longctx_hf is tested with transformers {low} to {high}; install a release in that range. Nothing "
            "was changed.")


_CONTRACTS: dict = {}  # name -> (what longctx_hf relies on, check raising or returning a problem)
_RESULTS: dict = {}  # name -> None (holds) or the problem text, once per process


def contract(name: str, relies_on: str):
    """Register the check of one touchpoint (it raises, or returns a problem string, when the contract breaks)."""

    def register(check):
        _CONTRACTS[name] = (relies_on, check)
        return check

    return register


def contract_names() -> tuple:
    return tuple(_CONTRACTS)


def problem(name: str):
    """None if contract `name` holds with the installed versions, else what is wrong (checked once per process)."""
    if name not in _RESULTS:
        try:
            outcome = _CONTRACTS[name][1]()
        except Exception as err:  # a missing attribute, a changed signature, a different result: all mean "broken"
            outcome = f"{type(err).__name__}: {err}"
        _RESULTS[name] = outcome or None
    return _RESULTS[name]


def require(*names: str) -> None:
    """Raise InternalsChanged for the first named contract that does not hold (call before changing anything)."""
    for name in names:
        found = problem(name)
        if found is not None:
            raise InternalsChanged(name, _CONTRACTS[name][0], found)
    _warn_if_untested()


def forget_results() -> None:
    """Re-run every contract on the next `require` (tests that break an internal on purpose use this)."""
    _RESULTS.clear()


def is_newer_than_tested(version: str | None = None) -> bool:
    version = transformers.__version__ if version is None else version
    return Version(version).release > Version(TESTED_TRANSFORMERS[1]).release


_warned = []  # holds one entry once the installed version has been checked (require runs on hot paths too)


def _warn_if_untested():
    if _warned:
        return
    _warned.append(True)
    if is_newer_than_tested():
        warnings.warn(f"transformers {transformers.__version__} is newer than the newest release longctx_hf was tested "
                      f"with ({TESTED_TRANSFORMERS[1]}); every internal it relies on passed its contract check",
                      stacklevel=3)


def _tiny_llama_config(**rope):
    from transformers import LlamaConfig

    parameters = {"rope_type": "default", "rope_theta": 10000.0, **rope}
    return LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8,
                       rope_parameters=parameters)


# ---------------------------------------------------------------------------------- the attention implementation
@contract("PreTrainedConfig._attn_implementation_internal",
          "writing it selects the attention function every attention module of a loaded model calls")
def _check_attn_implementation_internal():
    config = _tiny_llama_config()
    config._attn_implementation_internal = "sdpa"
    if config._attn_implementation != "sdpa":
        return f"config._attn_implementation reads {config._attn_implementation!r} after writing 'sdpa'"
    return None


def set_attention_implementation(config, name: str) -> None:
    """Select attention function `name` on an already built model's config (no re-validation, no reload)."""
    config._attn_implementation_internal = name


@contract("PreTrainedModel._can_set_attn_implementation",
          "a classmethod telling whether a model class routes attention through AttentionInterface")
def _check_can_set_attn_implementation():
    from transformers import LlamaForCausalLM

    if LlamaForCausalLM._can_set_attn_implementation() is not True:
        return "LlamaForCausalLM._can_set_attn_implementation() is not True"
    return None


def routes_attention_through_interface(model_class) -> bool:
    return bool(model_class._can_set_attn_implementation())


@contract("eager_attention_forward",
          "each model family keeps its eager attention function, named so, in its modeling module")
def _check_eager_attention_forward():
    from transformers.models.llama import modeling_llama

    eager_attention_for(modeling_llama.LlamaAttention)
    return None


def eager_attention_for(attention_class):
    """The family's own eager attention function (what transformers calls for attn_implementation='eager')."""
    eager = getattr(sys.modules[attention_class.__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{attention_class.__name__}: no eager_attention_forward to wrap; use sdpa")
    return eager


@contract("integrations.flex_attention.compile_friendly_flex_attention",
          "flex attention called as fn(query, key, value, score_mod=, block_mask=, scale=, training=)")
def _check_flex_attention():
    from transformers.integrations.flex_attention import compile_friendly_flex_attention

    parameters = inspect.signature(compile_friendly_flex_attention).parameters
    if "training" not in parameters or not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return f"its signature is {inspect.signature(compile_friendly_flex_attention)}"
    return None


def flex_attention(query, key, value, *, score_mod, block_mask, scale, training):
    require("integrations.flex_attention.compile_friendly_flex_attention")
    from transformers.integrations.flex_attention import compile_friendly_flex_attention

    return compile_friendly_flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask,
                                           scale=scale, training=training)


# ------------------------------------------------------------------------------------------- RoPE registries
@contract("modeling_rope_utils.ROPE_INIT_FUNCTIONS",
          "rotary modules look up fn(config, device, seq_len=...) -> (inv_freq, attention_factor) by rope_type")
def _check_rope_init_functions():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if not isinstance(ROPE_INIT_FUNCTIONS, dict):
        return f"it is a {type(ROPE_INIT_FUNCTIONS).__name__}, not a dict"
    missing = [name for name in ("linear", "dynamic", "yarn") if name not in ROPE_INIT_FUNCTIONS]
    if missing:
        return f"rope types {missing} are missing"
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["linear"](_tiny_llama_config(rope_type="linear", factor=2.0), "cpu")
    if tuple(inv_freq.shape) != (2,) or not math.isclose(float(scaling), 1.0):
        return f"the linear init returned shape {tuple(inv_freq.shape)} and scaling {scaling}"
    return None


# One registration policy for every shipped runtime: the first copy registered in a process serves the whole
# process (the installed package's, or a checkpoint's shipped copy loaded earlier with trust_remote_code); a later
# copy with another RUNTIME_VERSION is not used, and says so.
def _registered_first(existing, what: str) -> bool:
    """True if `existing` (a registered function or None) is kept; warns when it came from another version."""
    if existing is None:
        return False
    version = getattr(existing, "_longctx_runtime_version", None)
    if version != RUNTIME_VERSION:
        warnings.warn(f"{what} is already registered by longctx-hf runtime version {version}; this copy (version "
                      f"{RUNTIME_VERSION}) is not used in this process. Load checkpoints of one version per process",
                      stacklevel=3)
    return True


def _stamp(function):
    function._longctx_runtime_version = RUNTIME_VERSION
    return function


def register_rope_type(rope_type: str, init_function, validator) -> None:
    """Make transformers build rotary modules of `rope_type` with `init_function` and validate its configs with
    `validator(config, rope_parameters, ignore_keys)`."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RotaryEmbeddingConfigMixin

    if not _registered_first(ROPE_INIT_FUNCTIONS.get(rope_type), f"rope_type {rope_type!r}"):
        ROPE_INIT_FUNCTIONS[rope_type] = _stamp(init_function)
    name = f"_validate_{rope_type}_rope_parameters"
    if not hasattr(RotaryEmbeddingConfigMixin, name):
        setattr(RotaryEmbeddingConfigMixin, name, validator)


def register_attention(name: str, function, mask_function) -> None:
    """Register an attention function and its mask function under one name (without the mask function,
    transformers would pass attention_mask=None: padding silently ignored)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    existing = ALL_ATTENTION_FUNCTIONS[name] if name in ALL_ATTENTION_FUNCTIONS.valid_keys() else None
    if not _registered_first(existing, f"attention {name!r}"):
        AttentionInterface.register(name, _stamp(function))
        AttentionMaskInterface.register(name, mask_function)


def rope_init_function(rope_type: str):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS[rope_type]


@contract("RotaryEmbeddingConfigMixin._validate_<rope_type>_rope_parameters",
          "config validation calls the method of this name for a config's rope type")
def _check_rope_validators():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import RotaryEmbeddingConfigMixin

    if not callable(getattr(RotaryEmbeddingConfigMixin, "_validate_default_rope_parameters", None)):
        return "RotaryEmbeddingConfigMixin._validate_default_rope_parameters is gone"
    calls = []
    name = "_validate_longctx_probe_rope_parameters"
    setattr(RotaryEmbeddingConfigMixin, name, lambda config, parameters, ignore_keys=None: calls.append(parameters))
    try:
        LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                    rope_parameters={"rope_type": "longctx_probe", "rope_theta": 10000.0})
    finally:
        delattr(RotaryEmbeddingConfigMixin, name)
    if not calls:
        return f"building a config with rope_type 'longctx_probe' did not call RotaryEmbeddingConfigMixin.{name}"
    return None


def default_rope_validator():
    from transformers.modeling_rope_utils import RotaryEmbeddingConfigMixin

    return RotaryEmbeddingConfigMixin._validate_default_rope_parameters


@contract("modeling_rope_utils.dynamic_rope_update / original_inv_freq",
          "a rotary module keeps its pretrained frequencies in original_inv_freq and, once its rope_type is "
          "'default', is never re-scaled by transformers' dynamic update")
def _check_static_rotary():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(_tiny_llama_config(rope_type="dynamic", factor=2.0))
    if not isinstance(getattr(rotary, "original_inv_freq", None), torch.Tensor):
        return "the rotary module has no original_inv_freq tensor"
    make_rotary_static(rotary)
    rotary.inv_freq = torch.zeros_like(rotary.original_inv_freq)
    cos, sin = rotary(torch.zeros(1, 1, 64, 4), torch.arange(64)[None])
    if not (bool((cos == 1).all()) and bool((sin == 0).all())):
        return "a rotary module with rope_type 'default' and zero inv_freq still rotated past its pretrained length"
    return None


def make_rotary_static(rotary) -> None:
    """Stop transformers' dynamic update on this rotary module (its decorator checks the instance's rope_type)."""
    rotary.rope_type = "default"


def pretrained_inv_freq(rotary) -> torch.Tensor:
    return rotary.original_inv_freq


# ------------------------------------------------------------------------------------------------ the KV cache
@contract("cache_utils.Cache.layers / DynamicLayer",
          "a cache is a list of per-layer objects; a DynamicCache's are DynamicLayers, a StaticCache's are not")
def _check_cache_layers():
    from transformers.cache_utils import DynamicCache, StaticCache

    config = _tiny_llama_config()
    dynamic = DynamicCache()
    dynamic.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 0)
    if unsupported_cache_layers(dynamic):
        return f"a DynamicCache holds layers {unsupported_cache_layers(dynamic)}"
    static = StaticCache(config=config, max_cache_len=4)
    if not unsupported_cache_layers(static):
        return "a StaticCache is not told apart from a DynamicCache by its layers"
    return None


def caches_in(args, kwargs):
    """Every transformers Cache among a call's arguments, whatever the keyword (past_key_values, cache, ...)."""
    return [value for value in (*args, *kwargs.values()) if isinstance(value, Cache)]


def unsupported_cache_layers(cache) -> list:
    """Names of the cache's layer classes that do not hold the tokens seen so far, in order (empty: supported)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return [type(cache).__name__]
    kinds = {type(layer).__name__ for layer in layers}
    replicated = getattr(cache, "layer_class_to_replicate", None)
    if not layers and replicated is not None:
        kinds.add(replicated.__name__)
    return sorted(kinds - set(DYNAMIC_CACHE_LAYERS))


@contract("attention modules receive the cache",
          "each decoder layer hands the cache object to its attention module's forward")
def _check_attention_receives_cache():
    from transformers.models.llama.modeling_llama import LlamaAttention

    check_attention_receives_cache(LlamaAttention)
    return None


def check_attention_receives_cache(attention_class) -> None:
    """The cache refusal runs where attention receives the cache: its forward must take one."""
    names = list(inspect.signature(attention_class.forward).parameters)
    if not any("cache" in name or "past" in name for name in names):  # cache, past_key_values, layer_past, ...
        raise ValueError(f"{attention_class.__name__}.forward takes {names}, no cache: the runtime could not see "
                         "which cache the model runs with; this architecture is not supported")


def cache_keyword(model) -> str:
    """The keyword a model's forward takes its cache by: 'cache' (transformers >= 5.24) or 'past_key_values'."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def output_cache(outputs):
    """The cache a forward returned (outputs.cache in transformers >= 5.24, outputs.past_key_values before)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values


# --------------------------------------------------------------------------------- the model classes
@contract("models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING",
          "maps a config class to the transformers causal LM class of its architecture")
def _check_causal_lm_mapping():
    from transformers import LlamaConfig, LlamaForCausalLM

    if causal_lm_class(LlamaConfig()) is not LlamaForCausalLM:
        return "LlamaConfig does not map to LlamaForCausalLM"
    return None


def causal_lm_class(config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def load_native_causal_lm(pretrained_model_name_or_path, *args, config=None, **kwargs):
    """The transformers class the config's model_type names, loaded without remote code (what every shipped
    runtime's `auto_map` target loads before installing itself)."""
    from transformers import AutoConfig

    require("models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING")
    kwargs.pop("trust_remote_code", None)
    if config is None:
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
    return causal_lm_class(config).from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)


def rotary_dim(config) -> int:
    """The rotary dimension a transformers 5 rotary module builds: head_dim (or hidden_size / heads) times
    rope_parameters' partial_rotary_factor."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))


# ------------------------------------------------------------------- torch: CPU flash attention with log-sum-exp
def _flash_cpu_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@contract("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu",
          "returns (output, log-sum-exp) of softmax attention on CPU tensors (batch, heads, length, dim)")
def _check_flash_cpu():
    op = _flash_cpu_op()
    if op is None:
        return "the operator does not exist"
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 3, 4, generator=generator) for _ in range(3))
    output, lse = op(query, key, value, 0.0, True, scale=0.5)
    scores = (query @ key.transpose(-1, -2)) * 0.5
    scores = scores.masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), -math.inf)
    want_lse = torch.logsumexp(scores, dim=-1)
    want = torch.softmax(scores, dim=-1) @ value
    if not (torch.allclose(output, want, atol=1e-5) and torch.allclose(lse.reshape(want_lse.shape), want_lse,
                                                                        atol=1e-5)):
        return "its output or log-sum-exp differs from the definition"
    return None


def flash_attention_cpu_with_lse():
    """PyTorch's CPU flash kernel that also returns the log-sum-exp, or None when its contract does not hold
    (callers then take their explicit float32 path, which gives the same results more slowly)."""
    if problem("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu") is not None:
        return None
    return _flash_cpu_op()
