"""One attention call per block of prompt tokens past the pretrained length, for cache-exact dynamic RoPE.

Self-contained (torch only); shipped beside longctx_dynamic_rope.py, which imports it.

Why a block needs care: token p (length n_p) sees every key j rotated with its own frequencies w(n_p), so no two
queries share rotated keys. Per pair i of rotary channels, read as one complex number, the score is
    sigma_p^2 * Re( Q_p e^{i w_p p} * conj(K_j e^{i w_p j}) ).
Inside a block of consecutive queries the frequencies differ only slightly from the block's reference w_ref (those
of its middle query). With delta_p = w_p - w_ref and key positions j = c + h v (c the centre of the keys' range, h its
half-width, |v| <= 1), the Jacobi-Anger expansion gives
    e^{-i w_p j} = e^{-i w_ref j} * e^{-i delta_p c} * sum_r eps_r (-i)^r J_r(delta_p h) T_r(v)
(J_r Bessel functions of the first kind, T_r Chebyshev polynomials, eps_0 = 1, eps_r = 2). |T_r| <= 1 and
|J_r(x)| <= (x/2)^r / r!, so cutting pair i after R_i terms leaves at most 3 (x_i/2)^R / R! with x_i = max |delta_i| h.
R_i is the first R that brings this below the rounding one call per query already has for that pair: it computes
the angle w_i j in float32 (rounding up to 2^-24 * max(1, w_i * largest position)) and rounds cos and sin to the
attention's dtype (its unit roundoff u: 2^-24 in float32, 2^-8 in bf16). So the block's scores equal one call per
query up to that call's own rounding. Each kept term is one more set of features: keys rotated
once per block with w_ref and multiplied by T_r(v), queries rotated by the rest. One attention call then serves the
block, with 2 * sum_i R_i + (head_dim - rotary_dim) features instead of head_dim. Blocks are split until no pair
needs more than MAX_TERMS terms, and kept small enough that a block's scores stay within MAX_SCORES entries.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

MAX_BLOCK = 64
MAX_TERMS = 6
MAX_SCORES = 2 ** 25  # entries of a block's score matrix (128 MB in float32): bounds memory at any context length
FLOAT32_ROUNDOFF = 2.0 ** -24


@dataclass
class Block:
    """Queries [start, stop) of a prefill, the keys [0, keys) they may see, and what their features need."""

    start: int
    stop: int
    keys: int
    reference: torch.Tensor  # (rows, pairs) float32: the middle query's frequencies, per batch row
    centre: torch.Tensor  # (rows,) float64: centre of the keys' positions
    half_width: float
    kept: list  # kept[r]: the range (lo, hi) of pairs that keep term r, covering every pair that needs it
    coefficients: list  # coefficients[r]: complex128 (rows, 1, queries, hi - lo), scaling^2 included


def unit_roundoff(dtype) -> float:
    return torch.finfo(dtype).eps / 2


def terms_needed(x: torch.Tensor, tolerance) -> torch.Tensor:
    """Smallest R >= 1 per entry with 3 (x/2)^R / R! <= tolerance (0 <= x <= 1; tolerance a number or one per
    entry): Chebyshev terms 0 .. R-1 are kept."""
    terms = torch.ones_like(x, dtype=torch.long)
    bound, r = 3 * x / 2, 1
    while bool((bound > tolerance).any()):
        terms = torch.where(bound > tolerance, r + 1, terms)
        r += 1
        bound = bound * x / (2 * r)
    return terms


def bessel_j(orders: int, x: torch.Tensor) -> torch.Tensor:
    """J_0(x) .. J_{orders-1}(x), stacked on a new first dimension, by the power series (float64; |x| <= 1 here,
    where 12 terms are exact to double precision)."""
    r = torch.arange(orders, dtype=torch.float64).reshape(-1, *([1] * x.dim()))
    half = x / 2
    term = half ** r / torch.exp(torch.lgamma(r + 1))
    total = torch.zeros_like(term)
    for m in range(12):
        total = total + term
        term = -term * half * half / ((m + 1) * (m + 1 + r))
    return total


def plan_blocks(frequencies, positions, key_positions, start, length, roundoff, heads, max_block=MAX_BLOCK,
                max_terms=MAX_TERMS, max_scores=MAX_SCORES):
    """Split queries [start, queries) into blocks whose series need at most `max_terms` terms per pair and whose
    score matrix (heads x block x keys) has at most `max_scores` entries.

    `frequencies(n)` -> (inv_freq float32 (pairs,), attention scaling) at length n; positions (rows, queries);
    key_positions (rows, length) of the keys, consecutive, the last one the last query's; `roundoff`: the unit
    roundoff of the attention's dtype."""
    queries = positions.shape[1]
    blocks = []
    while start < queries:
        stop = min(start + max_block, queries)
        stop = min(stop, start + max(1, max_scores // (heads * (length - queries + stop))))
        while True:
            block = _block(frequencies, positions, key_positions, start, stop, length - queries + stop, roundoff)
            if block is not None and len(block.kept) <= max_terms or stop - start == 1:
                break
            stop = start + (stop - start) // 2
        blocks.append(block)
        start = stop
    return blocks


def _block(frequencies, positions, key_positions, start, stop, keys, roundoff):
    table = [[frequencies(int(p) + 1) for p in row] for row in positions[:, start:stop].tolist()]
    inv_freq = torch.stack([torch.stack([f for f, _ in row]) for row in table]).double()  # (rows, block, pairs)
    scaling = torch.tensor([[s for _, s in row] for row in table], dtype=torch.float64)  # (rows, block)
    middle = (stop - start - 1) // 2
    reference = inv_freq[:, middle].float()
    delta = inv_freq - reference.double()[:, None]
    first, last = key_positions[:, 0].double().cpu(), key_positions[:, keys - 1].double().cpu()
    centre, half_width = (first + last) / 2, max((keys - 1) / 2, 0.5)
    x = delta.abs().amax(dim=(0, 1)) * half_width
    if float(x.max()) > 1:  # outside the range the bound was derived for: the caller splits the block
        return None
    largest_position = float(max(first.abs().max(), last.abs().max()))
    # one call per query: the angle in float32, then cos and sin rounded to the attention's dtype
    angle_rounding = FLOAT32_ROUNDOFF * (reference.double().amax(dim=0) * largest_position).clamp(min=1)
    terms = terms_needed(x, angle_rounding + roundoff)
    query_positions = positions[:, start:stop].double().cpu()
    # sigma^2 e^{i (w_p p - delta_p c)}, then times eps_r (-i)^r J_r(delta_p h) for term r
    base = scaling[..., None] ** 2 * torch.polar(torch.ones_like(delta), inv_freq * query_positions[..., None]
                                                 - delta * centre[:, None, None])
    bessel = bessel_j(int(terms.max()), delta * half_width)
    kept, coefficients = [], []
    for r in range(len(bessel)):
        needing = torch.nonzero(terms > r).flatten()
        lo, hi = int(needing[0]), int(needing[-1]) + 1  # a range (a slice, no gather); extra pairs only add accuracy
        weight = (1 if r == 0 else 2) * (-1j) ** r * bessel[r, ..., lo:hi]
        kept.append((lo, hi))
        coefficients.append((base[..., lo:hi] * weight)[:, None])
    return Block(start, stop, keys, reference, centre, half_width, kept, coefficients)


def _split(states, pairs, interleaved):
    """(real parts, imaginary parts) of the rotary pairs, in the family's layout, and the channels past them."""
    if interleaved:
        return states[..., 0 : 2 * pairs : 2], states[..., 1 : 2 * pairs : 2], states[..., 2 * pairs :]
    return states[..., :pairs], states[..., pairs : 2 * pairs], states[..., 2 * pairs :]


def query_features(query, block, interleaved):
    """(rows, heads, block queries, features): each term's pairs multiplied by the term's complex coefficient."""
    real, imag, rest = _split(query, block.kept[0][1], interleaved)
    features = [rest]
    for (lo, hi), coefficient in zip(block.kept, block.coefficients):
        cos, sin = coefficient.real.to(query.device, query.dtype), coefficient.imag.to(query.device, query.dtype)
        x1, x2 = real[..., lo:hi], imag[..., lo:hi]
        features += [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    return torch.cat(features, dim=-1)


class Workspace:
    """Named buffers reused by every block, layer and step of inference forwards (a buffer is consumed before the
    next use of its name). Fresh score and feature tensors a little larger at every block (the keys grow) fragment
    the C heap: measured, a 16k prompt's peak memory grew by the size of one block's scores per block (+2 GB)
    without them."""

    def __init__(self):
        self._buffers = {}

    def take(self, name, shape, like):
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device \
                or buffer.is_inference() != torch.is_inference_mode_enabled():
            self._buffers[name] = buffer = torch.empty(int(numel * 1.25) + 4096, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)


def key_features(key, block, key_positions, interleaved, workspace=None):
    """(rows, kv heads, keys, features): keys rotated with the block's reference frequencies, times T_r(v) per
    term. Written into `workspace` if given (inference only: out= kernels have no autograd)."""
    pairs = block.kept[0][1]
    real, imag, rest = _split(key, pairs, interleaved)
    angles = key_positions[..., None].float() * block.reference.to(key.device)[:, None, :]  # float32, as transformers
    cos, sin = angles.cos().to(key.dtype)[:, None], angles.sin().to(key.dtype)[:, None]
    offsets = ((key_positions.double().cpu() - block.centre[:, None]) / block.half_width)
    offsets = offsets.to(key.device, key.dtype)[:, None, :, None]
    if workspace is None:
        rotated_real, rotated_imag = real * cos - imag * sin, imag * cos + real * sin
        features, previous, chebyshev = [rest, rotated_real, rotated_imag], torch.ones_like(offsets), offsets
        for lo, hi in block.kept[1:]:  # T_1 = v, T_{r+1} = 2 v T_r - T_{r-1}
            features += [rotated_real[..., lo:hi] * chebyshev, rotated_imag[..., lo:hi] * chebyshev]
            previous, chebyshev = chebyshev, 2 * offsets * chebyshev - previous
        return torch.cat(features, dim=-1)
    # the same features written in place: half the time of building the pieces and concatenating them (measured)
    width = rest.shape[-1] + 2 * sum(hi - lo for lo, hi in block.kept)
    out = workspace.take("keys", (*key.shape[:-1], width), key)
    at = rest.shape[-1]
    out[..., :at] = rest
    rotated_real, rotated_imag = out[..., at : at + pairs], out[..., at + pairs : at + 2 * pairs]
    torch.mul(real, cos, out=rotated_real).addcmul_(imag, sin, value=-1)
    torch.mul(imag, cos, out=rotated_imag).addcmul_(real, sin)
    at, previous, chebyshev = at + 2 * pairs, torch.ones_like(offsets), offsets
    for lo, hi in block.kept[1:]:
        torch.mul(rotated_real[..., lo:hi], chebyshev, out=out[..., at : at + hi - lo])
        torch.mul(rotated_imag[..., lo:hi], chebyshev, out=out[..., at + hi - lo : at + 2 * (hi - lo)])
        at, previous, chebyshev = at + 2 * (hi - lo), chebyshev, 2 * offsets * chebyshev - previous
    return out


def attend(query, key, value, mask, scaling, workspace=None):
    """softmax(q k^T * scaling + mask) v, as transformers' eager attention, with the query heads that share a key
    head stacked into one matrix product (no copies of the wide key features). Output (rows, queries, heads, dv).

    mask None: causal, the queries being the last keys (only those columns need masking). With `workspace`
    (inference only) the scores go into its buffer and the products run per key head (_matmul_per_key_head)."""
    rows, heads, queries, features = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    query = (query * scaling).reshape(rows, kv_heads, groups * queries, features)
    if workspace is None:
        scores = torch.matmul(query, key.transpose(-1, -2))
    else:
        scores = workspace.take("scores", (rows, kv_heads, groups * queries, key.shape[2]), query)
        _matmul_per_key_head(query, key.transpose(-1, -2), scores)
    scores = scores.view(rows, kv_heads, groups, queries, -1)
    if mask is None:
        future = torch.ones(queries, queries, dtype=torch.bool, device=scores.device).triu(1)
        scores[..., -queries:].masked_fill_(future, torch.finfo(scores.dtype).min)
    elif mask.dtype == torch.bool:
        scores.masked_fill_(~mask[:, :, None], torch.finfo(scores.dtype).min)
    else:
        scores.add_(mask[:, :, None])  # (rows, 1, 1, queries, keys): the same for every head
    if workspace is None or scores.dtype != torch.float32:
        probabilities = scores.softmax(dim=-1, dtype=torch.float32).to(value.dtype)
        output = torch.matmul(probabilities.view(rows, kv_heads, groups * queries, -1), value)
        return output.view(rows, heads, queries, -1).transpose(1, 2)
    # in place (no fresh block-sized tensor), normalised after the value product (one pass fewer over the scores)
    weights = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_().view(rows, kv_heads, groups * queries, -1)
    total = weights.sum(dim=-1, keepdim=True)
    output = torch.empty(rows, kv_heads, groups * queries, value.shape[-1], dtype=value.dtype, device=value.device)
    return _matmul_per_key_head(weights, value, output).div_(total).view(rows, heads, queries, -1).transpose(1, 2)


def _matmul_per_key_head(left, right, out):
    """left @ right into `out`, one matrix product per (batch row, key head): a single product spreads over all
    threads, where a batched one of three key heads over two threads leaves one idle a third of the time (the
    products alone, measured: 17-20% faster with two threads, the same with one)."""
    for row, head in itertools.product(range(out.shape[0]), range(out.shape[1])):
        torch.mm(left[row, head], right[row, head], out=out[row, head])
    return out


def causal_mask(block, queries, length, additive_dtype=None):
    """The block's causal mask when attention got none (no padding, no cache): bool for sdpa, additive for eager."""
    query_index = torch.arange(block.start, block.stop)[:, None] + (length - queries)
    allowed = (torch.arange(block.keys)[None, :] <= query_index)[None, None]
    if additive_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive_dtype).masked_fill(~allowed, torch.finfo(additive_dtype).min)
