"""Dynamic RoPE scaling (dynamic NTK, dynamic YaRN) that stays exact with a KV cache, for any transformers RoPE
decoder.

Self-contained (torch + transformers only): longctx_hf uses this file as its runtime, and copies it into
checkpoints that need it, where `from_pretrained(..., trust_remote_code=True)` loads it without longctx_hf.

Why transformers' own dynamic scaling is not exact with a cache: it rotates keys with the frequencies of the moment
and caches them rotated, so when the length grows the cached keys keep their old rotation. Re-rotating the cached
keys is not enough either: in a model with more than one layer, the cached keys and values of layer 2 onwards were
computed from hidden states that attended with the frequencies of *their* time. The one definition under which a
cache can be exact is causal: every token is computed with the frequencies of its own length n = position + 1
(the query and every key it attends to), which is exactly what happens when tokens are decoded one by one.

How:
- the model's rotary module is set to the identity (inverse frequencies 0, scaling 1), so the cache stores keys
  *before* rotation;
- an attention function registered with transformers' AttentionInterface (wrapping sdpa or eager; the matching mask
  function is registered under the same name) rotates each query and all keys it sees with the frequencies of the
  query's length, computed by the rope init function transformers itself uses for the rope type, then calls the
  wrapped attention. Decode steps (one query) and tokens below the pretrained length L (plain RoPE) cost one
  rotation of the keys per layer; prompt tokens past L, whose frequencies all differ, are served in blocks of
  queries by an exact series expansion of their frequency offsets (longctx_rope_blocks.py).
Keys are assumed to hold consecutive positions ending at the last query's position (true for DynamicCache, sliding
windows, left padding and generate); pad keys get meaningless angles but are masked.
"""
from __future__ import annotations

import math
import os
import tempfile

import torch
import torch.utils.checkpoint
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import longctx_compat as compat
from .longctx_compat import InternalsChanged  # noqa: F401  (this form makes transformers ship the sibling file)
from .longctx_rope_blocks import (
    MAX_BLOCK,
    MAX_TERMS,
    Workspace,
    attend,
    causal_mask,
    key_features,
    plan_blocks,
    query_features,
    unit_roundoff,
)

COMPAT_FILE = "longctx_compat.py"
BLOCKS_FILE = "longctx_rope_blocks.py"
# the internals this runtime relies on (longctx_compat.py), checked before a model is changed
RUNTIME_CONTRACTS = ("PreTrainedConfig._attn_implementation_internal", "modeling_rope_utils.ROPE_INIT_FUNCTIONS",
                     "RotaryEmbeddingConfigMixin._validate_<rope_type>_rope_parameters",
                     "modeling_rope_utils.dynamic_rope_update / original_inv_freq",
                     "cache_utils.Cache.layers / DynamicLayer", "attention modules receive the cache")
GUARD_ATTRIBUTE = "_longctx_guard"
DYNAMIC_ROPE_TYPES = ("dynamic", "dynamic_yarn", "dynamic_longrope")
SHIPPED_ROPE_TYPES = ("dynamic_yarn", "dynamic_longrope")  # no native form: their checkpoints carry this file
ATTENTION_PREFIX = "longctx_dynamic_rope:"
WRAPPABLE_ATTENTION = ("sdpa", "eager")
RUNTIME_ATTRIBUTE = "_longctx_dynamic_rope"
# attention keywords that leave the math softmax(q k^T * scaling + mask) v unchanged (the mask carries any sliding
# window); with any other keyword (softcap, sinks, ...) or dropout, blocks go through the wrapped attention instead
PLAIN_ATTENTION_KEYWORDS = ("position_ids", "scaling", "dropout", "sliding_window", "use_cache", "cache_position",
                            "output_attentions")
REMOTE_FILE = "longctx_dynamic_rope.py"


# ----------------------------------------------------------------------------------------------- dynamic YaRN
def _yarn_mscale(scale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * math.log(scale) + 1.0


def compute_dynamic_yarn_parameters(config, device=None, seq_len=None, layer_type=None):
    """YaRN whose scale follows the current length: s = max(1, n / L) (jquesnelle/yarn, dynamic variant).

    Same signature and return as transformers' ROPE_INIT_FUNCTIONS entries: (inv_freq float32, attention_factor).
    """
    _refuse_foreign_attention(config, "dynamic_yarn")
    config.standardize_rope_params()
    rope = config.rope_parameters
    base = float(rope["rope_theta"])
    original = int(rope["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rope.get("beta_fast", 32.0)), float(rope.get("beta_slow", 1.0))
    dim = compat.rotary_dim(config)
    n = original if seq_len is None else int(seq_len)
    scale = max(1.0, n / original)
    if scale <= 1:
        return _pretrained_inv_freq(base, dim, device), 1.0
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))

    def dim_for(rotations):
        return dim * math.log(original / (2 * math.pi * rotations)) / (2 * math.log(base))

    low = max(math.floor(dim_for(beta_fast)), 0)
    high = min(math.ceil(dim_for(beta_slow)), dim - 1)
    if high == low:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / scale * ramp + inv_freq * (1 - ramp)
    return inv_freq.to(torch.float32), _yarn_mscale(scale)


def compute_dynamic_longrope_parameters(config, device=None, seq_len=None, layer_type=None):
    """LongRoPE's switch with pretrained short factors: plain RoPE while the length n is at most L, then
    inv_i = 1 / (λ_i b^(2i/d)) with `long_factor` λ and the attention factor (default sqrt(1 + ln s / ln L))."""
    _refuse_foreign_attention(config, "dynamic_longrope")
    config.standardize_rope_params()
    rope = config.rope_parameters
    base = float(rope["rope_theta"])
    original = int(rope["original_max_position_embeddings"])
    dim = compat.rotary_dim(config)
    n = original if seq_len is None else int(seq_len)
    if n <= original:
        return _pretrained_inv_freq(base, dim, device), 1.0
    factors = torch.tensor([float(f) for f in rope["long_factor"]], dtype=torch.float64, device=device)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)) / factors
    attention = rope.get("attention_factor")
    if attention is None:
        attention = math.sqrt(1 + math.log(float(rope["factor"])) / math.log(original))
    return inv_freq.to(torch.float32), float(attention)


def _pretrained_inv_freq(base, dim, device):
    """Plain RoPE, computed exactly as transformers' default rope does (same float32 bits)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base ** exponents)


def _refuse_foreign_attention(config, rope_type):
    """A model being built with an attention the runtime cannot wrap (e.g. vLLM's transformers backend) would never
    activate it, and would run these frequencies without the runtime, i.e. something else: refuse."""
    name = getattr(config, "_attn_implementation", None)
    if name is not None and base_attention_name(name) not in WRAPPABLE_ATTENTION:
        raise ValueError(f"this config has rope_type {rope_type!r}, which needs longctx's cache-exact attention "
                         f"(wrapping {WRAPPABLE_ATTENTION}), but the model is being built with attention {name!r}, "
                         "which would silently run something else. Load it with longctx_hf.from_pretrained(path) or "
                         "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True), with "
                         "attn_implementation='sdpa' or 'eager'")


def rotate(states, cos, sin, interleaved, fused=False, out=None):
    """Rotate the first rotary_dim channels of (batch, heads, length, head_dim) states, as transformers does.

    `fused` (used where no transformers result has to be matched bit for bit) writes into one output (`out` if
    given) with multiply-add kernels: ~1.5x faster than transformers' formula, equal to it up to float rounding.
    Out= kernels have no autograd, so training forwards take transformers' formula."""
    half = cos.shape[-1]
    if fused and not interleaved and not (torch.is_grad_enabled() and states.requires_grad):
        out = torch.empty_like(states) if out is None else out
        x1, x2, o1, o2 = states[..., :half], states[..., half : 2 * half], out[..., :half], out[..., half : 2 * half]
        torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
        torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
        if 2 * half < states.shape[-1]:
            out[..., 2 * half :] = states[..., 2 * half :]
        return out
    if interleaved:
        x1, x2 = states[..., 0 : 2 * half : 2], states[..., 1 : 2 * half : 2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = states[..., :half], states[..., half : 2 * half]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    if 2 * half == states.shape[-1]:
        return rotated
    return torch.cat((rotated, states[..., 2 * half :]), dim=-1)


# ------------------------------------------------------------------------------------------- the runtime
class DynamicRopeRuntime:
    """Rotates each query, and every key it attends to, with the frequencies of that query's own length."""

    def __init__(self, config, original_inv_freq, interleaved, base_attention, base_name, block_size=MAX_BLOCK):
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        self.init_fn = compat.rope_init_function(self.rope_type)
        self.original_length = _pretrained_length(config)
        self.original_inv_freq = original_inv_freq.detach().float().clone()
        self.interleaved = interleaved
        self.base_name, self.base_attention = base_name, base_attention
        self.block_size = block_size  # queries per attention call past L at most (1: one call per query)
        self.max_terms = MAX_TERMS  # blocks are halved until no pair needs more series terms
        self._frequencies, self._pretrained = {}, {}
        self.workspace = Workspace()  # buffers reused across layers and steps by inference forwards
        self._memo_key, self._memo = None, {}

    def frequencies(self, n: int, device):
        """(inv_freq, attention scaling) at length n: the pretrained RoPE up to L, as transformers does."""
        if n <= self.original_length:
            return self.original_inv_freq.to(device), 1.0
        if (n, device) not in self._frequencies:
            if len(self._frequencies) > 65536:
                self._frequencies.clear()
            # transformers passes max(position_ids) + 1 as a 0-d tensor; doing the same keeps its arithmetic
            inv_freq, scaling = self.init_fn(self.config, device, seq_len=torch.tensor(n, device=device))
            self._frequencies[n, device] = (inv_freq.float(), float(scaling))
        return self._frequencies[n, device]

    def cos_sin(self, key_positions, row_lengths, dtype):
        """cos, sin (batch, 1, keys, rotary_dim / 2): batch row b rotated with the frequencies for row_lengths[b]."""
        device = key_positions.device
        if int(row_lengths.max()) <= self.original_length:  # fixed frequencies: rows of one table kept across steps
            cos, sin = self._pretrained_table(int(key_positions.max()) + 1, device)
            index = key_positions.clamp(min=0)  # negative positions are left-padding keys, masked
            return cos[index].to(dtype)[:, None], sin[index].to(dtype)[:, None]
        pairs = [self.frequencies(int(n), device) for n in row_lengths.tolist()]
        inv_freq = torch.stack([f for f, _ in pairs])[:, None, :]
        freqs = key_positions[..., None].float() * inv_freq
        cos, sin = freqs.cos(), freqs.sin_()  # in place: fewer fresh tensors per step
        if any(s != 1.0 for _, s in pairs):  # (multiplying by 1.0 would change no bit)
            scaling = torch.tensor([s for _, s in pairs], dtype=torch.float32, device=device)[:, None, None]
            cos.mul_(scaling), sin.mul_(scaling)
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]

    def _pretrained_table(self, rows, device):
        """cos, sin of positions 0 .. rows-1 with the pretrained frequencies (the same float32 arithmetic as
        cos_sin past L, so the same bits), grown by doubling up to L: decoding below L adds nothing per step."""
        table = self._pretrained.get(device)
        if table is None or table[0].shape[0] < rows:
            size = min(max(rows, 2 * (0 if table is None else table[0].shape[0]), 256), self.original_length)
            freqs = torch.arange(size, device=device).float()[:, None] * self.original_inv_freq.to(device)
            self._pretrained[device] = table = (freqs.cos(), freqs.sin())
        return table

    def rotate(self, states, cos, sin, fused=False, reuse=False):
        """`reuse`: write into the workspace (a fresh multi-MB tensor per layer and step costs page faults comparable
        to the rotation itself; each layer's rotated keys are consumed by its attention call before the next layer
        rotates). Not with gradients on: autograd may keep the rotated keys (e.g. an adapter on the queries only)."""
        out = None
        if reuse and fused and not self.interleaved and not torch.is_grad_enabled():
            out = self.workspace.take("rotated keys", states.shape, states)
        return rotate(states, cos, sin, self.interleaved, fused, out)

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise RuntimeError(
                f"{type(module).__name__} does not pass position_ids to its attention function, which cache-exact "
                "dynamic RoPE needs; this architecture is not supported"
            )
        if self._memo_key is not position_ids:  # tables and block plans are per forward, shared by all layers
            self._memo_key, self._memo = position_ids, {}
        batch, queries, length = query.shape[0], query.shape[-2], key.shape[-2]
        plan_key = ("plan", batch, queries, length, key.device, key.dtype)
        plan = self._memo.get(plan_key)
        if plan is None:  # once per forward: every layer sees the same positions
            plan = self._memo[plan_key] = self._plan(position_ids, batch, queries, length, key.device, key.dtype)
        if plan[0] == "blocks":
            return self._attention_in_blocks(module, query, key, value, attention_mask, *plan[1:], **kwargs)
        _, cos, sin, query_cos, query_sin, fused = plan
        query = self.rotate(query, query_cos, query_sin, fused)
        key = self.rotate(key, cos, sin, fused, reuse=True)
        return self.base_attention(module, query, key, value, attention_mask, **kwargs)

    def _plan(self, position_ids, batch, queries, length, device, dtype):
        """What every layer of one forward needs: ("rotate", cos, sin, query cos, query sin, fused) when one
        rotation serves every query (a decode step, or all queries within L), else ("blocks", positions,
        key_positions, lengths)."""
        positions = position_ids.to(device).expand(batch, -1)
        # keys hold consecutive positions ending at the last query's (pads get meaningless, masked angles)
        key_positions = positions[:, -1:] - (length - 1) + torch.arange(length, device=device)
        lengths = positions + 1  # each token is computed at its own length, as when it was decoded
        longest = int(lengths.max())
        if queries > 1 and longest > self.original_length:
            return "blocks", positions, key_positions, lengths
        cos, sin = self.cos_sin(key_positions, lengths[:, -1], dtype)
        return ("rotate", cos, sin, cos[..., length - queries :, :], sin[..., length - queries :, :],
                longest > self.original_length)

    def _attention_in_blocks(self, module, query, key, value, attention_mask, positions, key_positions, lengths,
                             **kwargs):
        """A prompt past L: the leading queries within L in one call, the rest in blocks (longctx_rope_blocks)."""
        queries, length = query.shape[-2], key.shape[-2]
        if attention_mask is not None and (attention_mask.ndim != 4 or attention_mask.shape[-1] != length):
            raise RuntimeError(f"unexpected attention mask of shape {tuple(attention_mask.shape)} for {length} keys")
        if kwargs.get("scaling") is None:  # the features are wider than head_dim; the scale must stay the head's
            kwargs["scaling"] = query.shape[-1] ** -0.5
        outputs = []
        # leading queries that are within L in every row share the pretrained frequencies: one call for all of them
        first = int((lengths > self.original_length).any(dim=0).float().argmax())
        if first:
            limit = length - queries + first
            cos, sin = self.cos_sin(key_positions[:, :limit], lengths[:, first - 1], key.dtype)
            mask = None if attention_mask is None else attention_mask[:, :, :first, :limit]
            output, _ = self.base_attention(module, self.rotate(query[:, :, :first], cos[..., -first:, :],
                                                                sin[..., -first:, :]),
                                            self.rotate(key[:, :, :limit], cos, sin), value[:, :, :limit], mask,
                                            **kwargs)
            outputs.append(output)
        plan_key = ("blocks", query.shape[0], queries, length, first, query.dtype)
        if plan_key not in self._memo:
            self._memo[plan_key] = plan_blocks(lambda n: self.frequencies(n, torch.device("cpu")), positions.cpu(),
                                               key_positions.cpu(), first, length, unit_roundoff(query.dtype),
                                               query.shape[1], self.block_size, self.max_terms)
        plain = (set(kwargs) <= set(PLAIN_ATTENTION_KEYWORDS) and not kwargs.get("dropout")
                 and not kwargs.get("output_attentions") and (attention_mask is None or attention_mask.shape[1] == 1))
        additive = None if plain or self.base_name == "sdpa" else query.dtype
        for block in self._memo[plan_key]:
            if attention_mask is None:
                mask = None if plain else causal_mask(block, queries, length, additive).to(query.device)
            else:
                mask = attention_mask[:, :, block.start : block.stop, : block.keys]

            def block_attention(query_block, key_block, value_block, block=block, mask=mask):
                workspace = None if torch.is_grad_enabled() else self.workspace
                features = (query_features(query_block, block, self.interleaved),
                            key_features(key_block, block, key_positions[:, : block.keys], self.interleaved,
                                         workspace))
                if plain:
                    return attend(*features, value_block, mask, kwargs["scaling"], workspace)
                return self.base_attention(module, *features, value_block, mask, **kwargs)[0]

            arguments = (query[:, :, block.start : block.stop], key[:, :, : block.keys], value[:, :, : block.keys])
            if torch.is_grad_enabled() and any(t.requires_grad for t in arguments):
                # recomputed in backward: the per-block features would otherwise be kept for every block
                outputs.append(torch.utils.checkpoint.checkpoint(block_attention, *arguments, use_reentrant=False))
            else:
                outputs.append(block_attention(*arguments))
        return torch.cat(outputs, dim=1), None


def _pretrained_length(config) -> int:
    rope = config.rope_parameters
    if rope["rope_type"] == "dynamic":
        return int(config.max_position_embeddings)  # transformers' dynamic NTK threshold
    return int(rope["original_max_position_embeddings"])


# ------------------------------------------------------------------------------------ registration, activation
def dispatch_to_runtime(attribute, not_activated):
    """An AttentionInterface function that hands each call to the runtime `activate` stored on the attention module
    (one registered function serves every model; `not_activated` explains a model that was never activated)."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        runtime = getattr(module, attribute, None)
        if runtime is None:
            raise RuntimeError(f"{type(module).__name__}: {not_activated}")
        return runtime.attention(module, query, key, value, attention_mask, **kwargs)

    return attention


_dispatching_attention = dispatch_to_runtime(
    RUNTIME_ATTRIBUTE, "its config selects cache-exact dynamic RoPE attention but this model was not activated; a "
    "config copied from an extended model carries that name. Load with longctx_hf.from_pretrained / extend_context, "
    "or set attn_implementation='sdpa'")


def _check_rope_numbers(rope_parameters, rope_type, keys):
    """A config with bad values fails on load, naming the key (transformers' validation hooks call this)."""
    original = rope_parameters.get("original_max_position_embeddings")
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise ValueError("rope_parameters['original_max_position_embeddings'] must be a positive int for rope_type "
                         f"{rope_type!r}, got {original!r}")
    for key in keys:
        value = rope_parameters.get(key, 1.0)
        if value is None and key == "attention_factor":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"rope_parameters[{key!r}] must be a positive number for rope_type {rope_type!r}, "
                             f"got {value!r}")


def _validate_dynamic_yarn_rope_parameters(config, rope_parameters, ignore_keys=None):
    _check_rope_numbers(rope_parameters, "dynamic_yarn", ("factor", "beta_fast", "beta_slow"))


def _validate_dynamic_longrope_rope_parameters(config, rope_parameters, ignore_keys=None):
    _check_rope_numbers(rope_parameters, "dynamic_longrope", ("factor", "attention_factor"))
    if rope_parameters.get("factor") is None or rope_parameters["original_max_position_embeddings"] < 2:
        raise ValueError("rope_type 'dynamic_longrope' needs rope_parameters['factor'] and an "
                         "original_max_position_embeddings of at least 2 (its default attention factor uses both)")
    factors = rope_parameters.get("long_factor")
    count = compat.rotary_dim(config) // 2
    if (not isinstance(factors, list) or len(factors) != count
            or not all(not isinstance(f, bool) and isinstance(f, (int, float)) and math.isfinite(f) and f >= 1
                       for f in factors)):
        raise ValueError(f"rope_parameters['long_factor'] must be a list of {count} numbers >= 1 (one per rotary "
                         f"frequency) for rope_type 'dynamic_longrope', got {factors!r}")


def register():
    """Make rope_types 'dynamic_yarn' and 'dynamic_longrope' loadable and register the wrapped attention + mask
    functions (idempotent)."""
    compat.register_rope_type("dynamic_yarn", compute_dynamic_yarn_parameters, _validate_dynamic_yarn_rope_parameters)
    compat.register_rope_type("dynamic_longrope", compute_dynamic_longrope_parameters,
                              _validate_dynamic_longrope_rope_parameters)
    for base in WRAPPABLE_ATTENTION:
        compat.register_attention(ATTENTION_PREFIX + base, _dispatching_attention, ALL_MASK_ATTENTION_FUNCTIONS[base])


def _rotary_modules(model):
    return [m for m in model.modules()
            if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and hasattr(m, "config")
            and hasattr(m, "original_inv_freq")]


def _layout_is_interleaved(rotary, inv_freq) -> bool:
    """Read the family's cos layout from its own rotary module: halves (cat(f, f)) or interleaved (f0 f0 f1 f1)."""
    if inv_freq.is_meta:  # a model built on the meta device: the layout is the class's, so probe a CPU twin
        with torch.device("cpu"):
            rotary = type(rotary)(rotary.config)
        inv_freq = rotary.inv_freq
    probe = torch.zeros(1, 1, 1, dtype=torch.float32, device=inv_freq.device)
    cos, _ = rotary(probe, torch.ones(1, 1, dtype=torch.long, device=inv_freq.device))
    cos = cos.reshape(-1).double().cpu()
    want = torch.cos(inv_freq.double().cpu())
    half = want.numel()
    if cos.numel() == 2 * half and torch.allclose(cos[:half], want) and torch.allclose(cos[half:], want):
        return False
    if cos.numel() == 2 * half and torch.allclose(cos[0::2], want) and torch.allclose(cos[1::2], want):
        return True
    raise ValueError(f"{type(rotary).__name__} lays out cos/sin in an unknown way; cache-exact dynamic RoPE "
                     "supports the standard halves and interleaved layouts only")


def attention_modules(model, config=None):
    """The attention modules (they carry layer_idx; decoder layers also hold an mlp), those built from `config`
    if given."""
    return [m for m in model.modules()
            if getattr(m, "config", None) is not None and (config is None or m.config is config)
            and hasattr(m, "layer_idx") and not hasattr(m, "mlp")]


def check_supported(model, rotary, base=None):
    """Raise a ValueError, before anything is modified, if `activate` could not serve this model (and
    InternalsChanged if the installed transformers no longer provides what the runtime relies on). `base`: the
    attention implementation to wrap (default: what the config names)."""
    compat.require(*RUNTIME_CONTRACTS)
    _base_implementation(rotary.config if base is None else base)
    _layout_is_interleaved(rotary, rotary.inv_freq)
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__}: no attention module with layer_idx; cache-exact dynamic RoPE "
                         "does not support this architecture")
    for cls in {type(m) for m in modules}:
        compat.check_attention_receives_cache(cls)


def base_attention_name(name):
    """The attention implementation this runtime wraps (`name` itself when it is not one of ours)."""
    return name[len(ATTENTION_PREFIX):] if name and name.startswith(ATTENTION_PREFIX) else name


def _base_implementation(config_or_name) -> str:
    name = config_or_name if isinstance(config_or_name, str) else config_or_name._attn_implementation
    base = base_attention_name(name or "eager")
    if base not in WRAPPABLE_ATTENTION:
        raise ValueError(f"cache-exact dynamic RoPE wraps attention implementations {WRAPPABLE_ATTENTION}, not "
                         f"{base!r}; load the model with attn_implementation='sdpa' or 'eager'")
    return base


def activate(model, base=None):
    """Install the cache-exact runtime on a model whose config has a rope_type of DYNAMIC_ROPE_TYPES.
    `base`: the attention implementation to wrap (default: what the config names)."""
    register()
    rotaries = _rotary_modules(model)
    if not rotaries:
        raise ValueError(f"{type(model).__name__} has no standard rotary module (inv_freq + original_inv_freq)")
    config = rotaries[0].config
    rope_type = config.rope_parameters.get("rope_type")
    if rope_type not in DYNAMIC_ROPE_TYPES:
        raise ValueError(f"cache-exact dynamic RoPE needs rope_type in {DYNAMIC_ROPE_TYPES}, got {rope_type!r}")
    check_supported(model, rotaries[0], base)
    base = _base_implementation(config if base is None else base)
    deactivate(model)  # activating twice must not leave a second set of hooks behind
    original, interleaved = make_rotaries_identity(rotaries)
    modules = attention_modules(model, config)
    if not modules:
        raise ValueError(f"{type(model).__name__}: no attention module (with layer_idx) shares the rotary config")
    runtime = DynamicRopeRuntime(config, original, interleaved, _base_attention(base, modules[0]), base)
    for module in modules:
        setattr(module, RUNTIME_ATTRIBUTE, runtime)
    compat.set_attention_implementation(config, ATTENTION_PREFIX + base)
    guard_attention(modules, "cache-exact dynamic RoPE", lambda name: (name or "").startswith(ATTENTION_PREFIX))
    if rope_type in SHIPPED_ROPE_TYPES:
        save_remote_code_with(model, remote_files())
    return model


def make_rotaries_identity(rotaries):
    """Turn the model's rotary modules into the identity, so the KV cache stores keys before rotation.

    Returns the pretrained inverse frequencies and whether the family's cos/sin layout is interleaved."""
    original = compat.pretrained_inv_freq(rotaries[0]).detach().clone()
    for rotary in rotaries:
        compat.make_rotary_static(rotary)
        rotary.attention_scaling = 1.0
        rotary.inv_freq = original.clone().to(rotary.original_inv_freq.device)
    interleaved = _layout_is_interleaved(rotaries[0], original)
    for rotary in rotaries:
        # identity rotation: cos = cos(0) * 1 = 1, sin = 0
        rotary.inv_freq = torch.zeros_like(rotary.original_inv_freq)
    return original, interleaved


def guard_attention(modules, runtime_name, is_ours):
    """Forward pre-hooks on the attention modules that refuse, where attention actually runs, what would silently
    lose positions: another attention implementation selected after activation (the rotary module is the identity),
    or a cache that is not a DynamicCache, whatever keyword or route (generate's cache_implementation,
    past_key_values=, cache=) brought it there."""

    def check(module, args, kwargs):
        implementation = module.config._attn_implementation
        if not is_ours(implementation):
            raise ValueError(f"attention implementation {implementation!r} was set after {runtime_name} was "
                             "installed; it would run without positions. Call extend_context (or activate) again")
        for cache in compat.caches_in(args, kwargs):
            unsupported = compat.unsupported_cache_layers(cache)
            if unsupported:
                raise ValueError(f"{runtime_name} (keys cached before rotation) supports DynamicCache (the "
                                 f"default) only, got a {type(cache).__name__} with layers {unsupported}; do not "
                                 "pass cache_implementation or a static cache to generate")

    for module in modules:
        remove_guard(module)
        module.__dict__[GUARD_ATTRIBUTE] = module.register_forward_pre_hook(check, with_kwargs=True)


def remove_guard(module) -> bool:
    handle = module.__dict__.pop(GUARD_ATTRIBUTE, None)
    if handle is not None:
        handle.remove()
    return handle is not None


def is_active(model) -> bool:
    return any(RUNTIME_ATTRIBUTE in module.__dict__ for module in model.modules())


def deactivate(model):
    """Undo `activate` on the attention side (the caller rebuilds the rotary module)."""
    config = getattr(model, "config", None)
    for module in model.modules():
        if RUNTIME_ATTRIBUTE in module.__dict__:
            delattr(module, RUNTIME_ATTRIBUTE)
            remove_guard(module)
            config = module.config
    implementation = getattr(config, "_attn_implementation", None) or ""
    if implementation.startswith(ATTENTION_PREFIX):
        compat.set_attention_implementation(config, implementation[len(ATTENTION_PREFIX):])
    model.__dict__.pop("save_pretrained", None)


def _base_attention(base, attention_module):
    if base == "eager":  # each family keeps its own eager function beside its attention class
        return compat.eager_attention_for(type(attention_module))
    return ALL_ATTENTION_FUNCTIONS[base]


# ------------------------------------------------------------------------------- remote code in checkpoints
def source() -> str:
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        return f.read()


def remote_files() -> dict:
    """This file and the siblings it imports, as written beside config.json."""
    folder = os.path.dirname(os.path.abspath(__file__))
    files = {REMOTE_FILE: source()}
    for name in (BLOCKS_FILE, COMPAT_FILE):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            files[name] = f.read()
    return files


def write_remote_code(save_directory, files):
    """Write `files` ({name: source}) beside config.json, each atomically (temp + rename)."""
    for name, text in files.items():
        handle, temporary = tempfile.mkstemp(dir=save_directory, prefix=".tmp-", suffix=".py")
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, os.path.join(save_directory, name))


def save_remote_code_with(model, files):
    """Make this model's save_pretrained also write the remote code its config's auto_map points to: each file
    atomically, and only from the process that writes the checkpoint (`is_main_process`, as transformers)."""
    cls_save = type(model).save_pretrained

    def save_pretrained(self, save_directory, *args, **kwargs):
        result = cls_save(self, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory, files)
        return result

    model.save_pretrained = save_pretrained.__get__(model)


class DynamicRopeForCausalLM:
    """`auto_map` target: loads the architecture named by the config's own model_type, then activates.

    Not a model class itself, so one file serves every architecture (llama, mistral, gpt_neox, ...).
    """

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        pass

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        register()
        return activate(compat.load_native_causal_lm(pretrained_model_name_or_path, *args, config=config, **kwargs))


register()
