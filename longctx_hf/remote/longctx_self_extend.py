"""SelfExtend (Jin et al. 2024, arXiv 2401.01325) for any transformers RoPE decoder: grouped attention, no training.

Self-contained (torch + transformers, plus its sibling longctx_dynamic_rope.py): longctx_hf uses this file as its
runtime and copies both files into checkpoints, where `from_pretrained(..., trust_remote_code=True)` loads them
without longctx_hf.

Definition: for query i and key j <= i the logit uses RoPE at distance i - j when i - j < W (neighbour window),
else at the grouped distance floor(i/G) - floor(j/G) + (W - floor(W/G)).

How:
- the model's rotary module is the identity, so the KV cache stores keys *before* rotation; every forward rotates
  queries and keys twice: at their own positions (neighbour part) and at grouped positions (query:
  floor(i/G) + W - floor(W/G), key: floor(j/G)), whose differences are exactly the two distances above;
- the softmax over each query's causal keys is split into parts that are merged exactly by their log-sum-exp:
  * grouped keys (j <= i - W): one causal attention of the grouped queries i >= W against the grouped keys
    j < K - W (shifted by W), with the kernel's causal mode, no mask (with padding: per query block, masked);
  * neighbour keys (i - W < j <= i), per block of QUERY_BLOCK queries: a thin strip with a block x block mask,
    the keys the whole block sees, and the block's own keys in causal mode.
  The work is causal attention plus a band of width W. No n x n score matrix exists at any point: memory is O(n)
  (block x block masks, rotated copies of the keys).
- while every distance is below W (short inputs, the first W tokens) it is the wrapped sdpa/eager attention on
  plainly rotated states: bit-identical to the unextended model.
Keys are assumed to hold consecutive positions ending at the last query's position (true for DynamicCache, left
padding and generate); pad keys get meaningless positions but are masked.
"""
from __future__ import annotations

import math

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from . import longctx_compat as compat
from . import longctx_dynamic_rope as shared
from .longctx_compat import InternalsChanged  # noqa: F401  (this form makes transformers ship the sibling files)
from .longctx_dynamic_rope import REMOTE_FILE as SHARED_FILE  # noqa: F401
from .longctx_rope_blocks import MAX_BLOCK  # noqa: F401  (transformers 5.0 ships only direct relative imports)

ROPE_TYPE = "self_extend"
ATTENTION_NAME = "longctx_self_extend"
RUNTIME_ATTRIBUTE = "_longctx_self_extend"
REMOTE_FILE = "longctx_self_extend.py"
QUERY_BLOCK = 512  # queries per attention block (at most W): masks are at most block x block
MATH_BLOCK_ELEMENTS = 1 << 26  # the explicit (math) path keeps batch x heads x block x keys under this


def compute_self_extend_parameters(config, device=None, seq_len=None, layer_type=None):
    """Plain RoPE frequencies, computed exactly as transformers' default rope does (same float32 bits):
    SelfExtend changes which positions meet, not the frequencies.

    Refuses a model being built with another attention: it would silently run plain RoPE past the window."""
    if config._attn_implementation != ATTENTION_NAME:
        raise ValueError(f"this config has rope_type {ROPE_TYPE!r}, which needs SelfExtend's attention, but the model "
                         f"is being built with attention {config._attn_implementation!r}, which would silently run "
                         "plain RoPE. Load it with longctx_hf.from_pretrained(path) or "
                         "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    config.standardize_rope_params()
    rope = config.rope_parameters
    dim = compat.rotary_dim(config)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (float(rope["rope_theta"]) ** exponents), 1.0


# --------------------------------------------------------------------------- attention with its log-sum-exp
def _attend_flash_cpu(kernel, query, key, value, mask, scale, dropout, causal):
    """PyTorch's CPU flash kernel (tiles internally, O(n) memory; GQA and broadcast masks supported).
    Its log-sum-exp carries no gradient, so it serves forwards without autograd only."""
    additive = None
    if mask is not None:
        additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, -math.inf)
    output, lse = kernel(query, key, value, dropout, causal, attn_mask=additive, scale=scale)
    return output, lse


def _attend_math(query, key, value, mask, scale, dropout, causal):
    """Explicit scores in float32, by query block so that no more than MATH_BLOCK_ELEMENTS scores exist at once."""
    batch, heads, queries, dim = query.shape
    groups = heads // key.shape[1]
    keys = key.shape[-2]
    step = max(1, MATH_BLOCK_ELEMENTS // max(1, batch * heads * keys))
    outputs, lses = [], []
    k = key.float()[:, :, None]
    v = value.float()[:, :, None]
    for start in range(0, queries, step):
        q = query[:, :, start : start + step].float()
        q = q.reshape(batch, key.shape[1], groups, q.shape[-2], dim)
        scores = (q @ k.transpose(-1, -2)) * scale  # (batch, kv heads, groups, block, keys)
        if mask is not None:  # (batch|1, 1, block, keys) -> broadcast over kv heads and groups
            block_mask = mask[..., start : start + step, :]
            scores = scores.masked_fill(~block_mask[:, :, None], -math.inf)
        if causal:
            rows = torch.arange(start, start + q.shape[-2], device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(keys, device=q.device)[None, :] > rows, -math.inf)
        lse = torch.logsumexp(scores, dim=-1)
        weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        if dropout:
            weights = torch.nn.functional.dropout(weights, p=dropout)
        outputs.append((weights @ v).reshape(batch, heads, -1, dim))
        lses.append(lse.reshape(batch, heads, -1))
    return torch.cat(outputs, dim=2).to(query.dtype), torch.cat(lses, dim=2)


def attend_with_lse(query, key, value, mask, scale, dropout=0.0, force_math=False, causal=False):
    """(output, log-sum-exp per query) of softmax attention; `mask` is a bool (batch|1, 1, queries, keys) tensor
    or None; `causal` (square inputs, no mask): query t sees keys <= t. Rows with no allowed key get output 0 and
    log-sum-exp -inf (so they weigh nothing in a merge)."""
    if causal:
        assert mask is None and query.shape[-2] == key.shape[-2]
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    kernel = compat.flash_attention_cpu_with_lse() if query.device.type == "cpu" else None
    if kernel is not None and not training and not force_math and key.shape[-2] > 0:
        output, lse = _attend_flash_cpu(kernel, query, key, value, mask, scale, dropout, causal)
        if mask is not None:  # the kernel reports log-sum-exp 0 for a fully masked row
            lse = lse.masked_fill(~mask.any(dim=-1), -math.inf)
        return output, lse.float()
    return _attend_math(query, key, value, mask, scale, dropout, causal)


def merge_by_lse(parts, with_lse=False):
    """Softmax attention over the union of disjoint key sets, from each set's (output, log-sum-exp)."""
    lses = torch.stack([lse for _, lse in parts])
    top = lses.max(dim=0).values
    top = torch.where(torch.isfinite(top), top, 0.0)
    weights = torch.exp(lses - top)  # (parts, batch, heads, queries)
    total = sum(w[..., None] * out.float() for w, (out, _) in zip(weights, parts))
    norm = weights.sum(dim=0)
    output = total / norm.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return (output, top + torch.log(norm)) if with_lse else output


def _refuse_packed_positions(position_ids):
    """Grouped distances depend on absolute positions, which are derived from each row's last position: documents
    packed into one row (positions that restart after counting up) would silently get others' positions. Left
    padding (pads at one constant position, as generate writes them) is fine."""
    steps = position_ids.diff(dim=-1)
    if steps.shape[-1] > 1 and bool(((steps[..., 1:] < 0) & (steps[..., :-1] > 0)).any()):
        raise ValueError("SelfExtend needs consecutive positions in each row; these position_ids restart, as in "
                         "packed sequences, which SelfExtend does not support: pass one document per row")


# ------------------------------------------------------------------------------------------------ the runtime
class SelfExtendRuntime:
    """Neighbour window + grouped attention on keys cached before rotation."""

    def __init__(self, config, original_inv_freq, interleaved, base_attention, base_name="sdpa"):
        rope = config.rope_parameters
        self.group_size, self.window = int(rope["group_size"]), int(rope["window"])
        self.inv_freq = original_inv_freq.detach().float().clone()
        self.interleaved = interleaved
        self.base_attention = base_attention
        self.base_name = base_name  # "sdpa" or "eager": the model's attention for inputs within the window
        self.force_math = False  # tests: the explicit path that serves GPUs and training, checked on CPU
        self._memo_key, self._memo = None, {}

    def _cos_sin(self, positions, dtype):
        """cos, sin (batch, 1, length, rotary_dim / 2) for integer positions (batch, length), as transformers."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        return freqs.cos().to(dtype)[:, None], freqs.sin().to(dtype)[:, None]

    def _tables(self, position_ids, length, queries, batch, dtype):
        """Neighbour and grouped cos/sin for the keys and queries; computed once per forward, shared by layers."""
        if self._memo_key is not position_ids:
            _refuse_packed_positions(position_ids)
            self._memo_key, self._memo = position_ids, {}
        memo_key = (batch, length, queries, dtype)
        if memo_key not in self._memo:
            positions = position_ids.expand(batch, -1)
            key_positions = positions[:, -1:] - (length - 1) + torch.arange(length, device=positions.device)
            query_positions = key_positions[:, length - queries :]
            shift = self.window - self.window // self.group_size
            self._memo[memo_key] = (
                self._cos_sin(key_positions, dtype),
                self._cos_sin(torch.div(key_positions, self.group_size, rounding_mode="floor"), dtype),
                self._cos_sin(torch.div(query_positions, self.group_size, rounding_mode="floor") + shift, dtype),
            )
        return self._memo[memo_key]

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise RuntimeError(f"{type(module).__name__} does not pass position_ids to its attention function, which "
                               "SelfExtend needs; this architecture is not supported")
        batch, queries, length = query.shape[0], query.shape[-2], key.shape[-2]
        (cos, sin), grouped_keys, grouped_queries = self._tables(position_ids.to(key.device), length, queries,
                                                                 batch, key.dtype)
        plain_query = shared.rotate(query, cos[..., length - queries :, :], sin[..., length - queries :, :],
                                    self.interleaved)
        plain_key = shared.rotate(key, cos, sin, self.interleaved)
        if length <= self.window:  # every distance < W: the unextended model, through its own attention function
            if self.base_name == "eager":  # the registered mask is sdpa's (bool, or None for plain causal)
                attention_mask = _eager_mask(attention_mask, queries, length, query)
            return self.base_attention(module, plain_query, plain_key, value, attention_mask, scaling=scaling,
                                       dropout=dropout, **kwargs)
        if attention_mask is not None and (attention_mask.dtype != torch.bool or attention_mask.ndim != 4
                                           or attention_mask.shape[-1] != length):
            raise RuntimeError(f"SelfExtend expects a boolean (batch, 1, queries, {length}) attention mask, got "
                               f"{attention_mask.dtype} {tuple(attention_mask.shape)}")
        group_query = shared.rotate(query, *grouped_queries, self.interleaved)
        group_key = shared.rotate(key, *grouped_keys, self.interleaved)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        dropout = dropout if module.training else 0.0
        offset = length - queries  # key index of query 0
        grouped = None
        if attention_mask is None:  # no padding: the whole grouped part is one causal problem (two calls at most)
            grouped = self._grouped_without_padding(group_query, group_key, value, offset, scale, dropout)
        block = max(1, min(QUERY_BLOCK, self.window))  # block <= W keeps every mask block x block
        outputs = []
        for first in range(0, queries, block):
            last = min(first + block, queries)
            start, end = offset + first, offset + last  # the block's queries, as key indices
            rows = torch.arange(start, end, device=key.device)[:, None]
            lo = max(0, start - self.window + 1)  # keys before lo are grouped for every query of the block
            mid = max(lo, end - self.window)  # keys in [lo, mid) are grouped for some queries, neighbours for others
            parts = []

            def part(q, k, first_key, end_key, allowed=None, causal=False):
                if end_key <= first_key:
                    return
                mask = None if allowed is None else allowed(torch.arange(first_key, end_key, device=key.device))
                if attention_mask is not None:
                    if causal:  # the padding mask replaces the kernel's causal flag
                        mask, causal = torch.arange(first_key, end_key, device=key.device)[None, :] <= rows, False
                    padding = attention_mask[:, :, first:last, first_key:end_key]
                    mask = padding if mask is None else padding & mask
                elif mask is not None:
                    mask = mask[None, None]
                parts.append(attend_with_lse(q[:, :, first:last], k[:, :, first_key:end_key],
                                             value[:, :, first_key:end_key], mask, scale, dropout, self.force_math,
                                             causal))

            if grouped is not None:
                parts.append((grouped[0][:, :, first:last], grouped[1][:, :, first:last]))
            else:
                part(group_query, group_key, 0, lo)  # grouped, seen by the whole block
                part(group_query, group_key, lo, mid, lambda j: j[None, :] <= rows - self.window)  # grouped, partly
            part(plain_query, plain_key, lo, mid, lambda j: j[None, :] > rows - self.window)  # neighbours, partly
            part(plain_query, plain_key, mid, start)  # neighbours of the whole block
            part(plain_query, plain_key, start, end, causal=True)  # the block's own keys: causal
            outputs.append(merge_by_lse(parts))
        output = torch.cat(outputs, dim=2).to(query.dtype)
        return output.transpose(1, 2).contiguous(), None


    def _grouped_without_padding(self, query, key, value, offset, scale, dropout):
        """(output, log-sum-exp) of every query over its grouped keys j <= i - W, for unpadded inputs.

        Queries i >= W have grouped keys; keys [0, K - W) are grouped for some query. Query t of those sees
        j <= c + t (c = its first key index - W): keys [0, c) are seen by all, the rest is a square causal block."""
        batch, heads, queries, dim = query.shape
        output = query.new_zeros(batch, heads, queries, dim, dtype=torch.float32)
        lse = torch.full((batch, heads, queries), -math.inf, device=query.device)
        first = max(0, self.window - offset)  # the first query with grouped keys
        if first >= queries:
            return output, lse
        seen_by_all = offset + first - self.window
        grouped_keys = key.shape[-2] - self.window
        parts = [attend_with_lse(query[:, :, first:], key[:, :, seen_by_all:grouped_keys],
                                 value[:, :, seen_by_all:grouped_keys], None, scale, dropout, self.force_math,
                                 causal=True)]
        if seen_by_all > 0:
            parts.append(attend_with_lse(query[:, :, first:], key[:, :, :seen_by_all], value[:, :, :seen_by_all],
                                         None, scale, dropout, self.force_math))
        merged_output, merged_lse = merge_by_lse(parts, with_lse=True)
        output[:, :, first:], lse[:, :, first:] = merged_output, merged_lse
        return output, lse


def _eager_mask(mask, queries, length, like):
    """sdpa's boolean mask (None: causal, queries aligned to the last keys) as the additive mask eager attention
    takes, with the same minimum value transformers' eager mask uses (so results match it bit for bit)."""
    if mask is None:
        rows = torch.arange(length - queries, length, device=like.device)[:, None]
        mask = (torch.arange(length, device=like.device)[None, :] <= rows)[None, None]
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.where(mask, zero, torch.finfo(like.dtype).min)


# ------------------------------------------------------------------------------------ registration, activation
_dispatching_attention = shared.dispatch_to_runtime(
    RUNTIME_ATTRIBUTE, f"this model's config selects SelfExtend attention ({ATTENTION_NAME!r}) but SelfExtend was not "
    "activated. Load it with longctx_hf.from_pretrained(path), or with "
    "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")


def _validate_self_extend_rope_parameters(config, rope_parameters, ignore_keys=None):
    """transformers' config validation hook for this rope type (a config with bad values fails on load)."""
    for key in ("group_size", "window", "original_max_position_embeddings"):
        value = rope_parameters.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"rope_parameters[{key!r}] must be a positive int for rope_type 'self_extend', got "
                             f"{value!r}")
    if rope_parameters["group_size"] < 2:
        raise ValueError(f"rope_parameters['group_size'] must be >= 2, got {rope_parameters['group_size']}")
    if rope_parameters["window"] >= rope_parameters["original_max_position_embeddings"]:
        raise ValueError("rope_parameters['window'] must be smaller than 'original_max_position_embeddings'")


def register():
    """Make rope_type 'self_extend' loadable and register the attention + mask functions (idempotent)."""
    compat.register_rope_type(ROPE_TYPE, compute_self_extend_parameters, _validate_self_extend_rope_parameters)
    compat.register_attention(ATTENTION_NAME, _dispatching_attention, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def current_base(model):
    """The base attention of a model: its runtime's when SelfExtend is active, else what its config names."""
    for module in model.modules():
        runtime = module.__dict__.get(RUNTIME_ATTRIBUTE)
        if runtime is not None:
            return runtime.base_name
    config = getattr(model, "config", None)
    return base_attention_name(getattr(config, "_attn_implementation", None))


def base_attention_name(name):
    """The attention implementation SelfExtend wraps for short inputs: sdpa unless the model uses eager."""
    name = shared.base_attention_name(name)
    return "sdpa" if name in (None, ATTENTION_NAME) else name


def check_supported(model, rotary, base=None):
    """Raise a ValueError, before anything is modified, if `activate` could not serve this model (and
    InternalsChanged if the installed transformers no longer provides what the runtime relies on)."""
    compat.require(*shared.RUNTIME_CONTRACTS)
    base = base_attention_name(base if base is not None else rotary.config._attn_implementation)
    if base not in shared.WRAPPABLE_ATTENTION:
        raise ValueError(f"SelfExtend computes its own attention and wraps {shared.WRAPPABLE_ATTENTION} for short "
                         f"inputs, not {base!r}; load the model with attn_implementation='sdpa' or 'eager'")
    shared._layout_is_interleaved(rotary, rotary.inv_freq)
    config = rotary.config
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"{type(model).__name__} uses attn_logit_softcapping={config.attn_logit_softcapping}, which "
                         "SelfExtend's attention does not implement; refusing rather than computing another model")
    attention_modules = shared.attention_modules(model)
    if not attention_modules:
        raise ValueError(f"{type(model).__name__}: no attention module with layer_idx; SelfExtend does not support "
                         "this architecture")
    if any(hasattr(m, "sinks") for m in attention_modules):
        raise ValueError(f"{type(model).__name__} uses attention sinks, which SelfExtend's attention does not "
                         "implement")
    for cls in {type(m) for m in attention_modules}:
        compat.check_attention_receives_cache(cls)


def activate(model, base=None):
    """Install SelfExtend on a model whose config has rope_type 'self_extend'. `base`: the attention
    implementation the model used before (default: what its config says, sdpa if that is SelfExtend itself)."""
    register()
    rotaries = shared._rotary_modules(model)
    if not rotaries:
        raise ValueError(f"{type(model).__name__} has no standard rotary module (inv_freq + original_inv_freq)")
    config = rotaries[0].config
    if config.rope_parameters.get("rope_type") != ROPE_TYPE:
        raise ValueError(f"SelfExtend needs rope_type {ROPE_TYPE!r}, got {config.rope_parameters.get('rope_type')!r}")
    base = base_attention_name(base if base is not None else current_base(model))
    check_supported(model, rotaries[0], base)
    deactivate(model)  # activating twice must not leave a second set of hooks behind
    original, interleaved = shared.make_rotaries_identity(rotaries)
    modules = shared.attention_modules(model, config)
    if not modules:
        raise ValueError(f"{type(model).__name__}: no attention module (with layer_idx) shares the rotary config")
    runtime = SelfExtendRuntime(config, original, interleaved, shared._base_attention(base, modules[0]), base)
    for module in modules:
        setattr(module, RUNTIME_ATTRIBUTE, runtime)
    compat.set_attention_implementation(config, ATTENTION_NAME)
    shared.guard_attention(modules, "SelfExtend", lambda name: name == ATTENTION_NAME)
    shared.save_remote_code_with(model, remote_files())
    return model


def is_active(model) -> bool:
    return any(RUNTIME_ATTRIBUTE in module.__dict__ for module in model.modules())


def deactivate(model):
    """Undo `activate` on the attention side (the caller rebuilds the rotary module)."""
    active = False
    for module in model.modules():
        runtime = module.__dict__.pop(RUNTIME_ATTRIBUTE, None)
        if runtime is not None:
            active = True
            shared.remove_guard(module)
            compat.set_attention_implementation(module.config, runtime.base_name)
    if active:
        model.__dict__.pop("save_pretrained", None)


def remote_files() -> dict:
    """This file and its siblings, as written beside config.json."""
    with open(__file__, encoding="utf-8") as f:
        own = f.read()
    return {REMOTE_FILE: own, **shared.remote_files()}


class SelfExtendForCausalLM(shared.DynamicRopeForCausalLM):
    """`auto_map` target: loads the architecture named by the config's own model_type, then activates SelfExtend
    (one file serves every architecture)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        from transformers import AutoConfig

        register()
        if config is None:
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        base = base_attention_name(kwargs.pop("attn_implementation", None) or config._attn_implementation)
        model = compat.load_native_causal_lm(pretrained_model_name_or_path, *args, config=config,
                                             attn_implementation=ATTENTION_NAME, **kwargs)
        return activate(model, base)


register()
