"""Perplexity of the same final tokens at growing context lengths, without full-vocabulary logits.

A 32k-token sequence times a 50k vocabulary is 6 GB of float32 logits, so the decoder's hidden states are
projected to the vocabulary in slices and only a running sum of the cross-entropy is kept.
"""
from __future__ import annotations

import glob
import math
import os
import sysconfig

SLICE = 1024  # positions projected to the vocabulary at once (1024 x 49k x 4 bytes = 200 MB)


def default_text(min_chars: int = 400_000) -> str:
    """Python standard-library sources (top-level modules, sorted by name): on every machine, deterministic for a
    given Python version, long enough for 100k+ tokens."""
    parts, total = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as handle:
            parts.append(handle.read())
        total += len(parts[-1])
        if total >= min_chars:
            break
    return "\n\n".join(parts)


def default_text_name() -> str:
    return f"Python {sysconfig.get_python_version()} standard library sources (top-level *.py, sorted by name)"


def _project(model, hidden):
    """Logits for `hidden` exactly as the model's own forward computes them (incl. the known output scalings)."""
    head = model.get_output_embeddings()
    logits = head(hidden.to(head.weight.device)).float()
    config = model.config
    if getattr(config, "logit_scale", None) is not None:  # Cohere
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:  # Granite
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None) is not None:  # Gemma 2
        cap = config.final_logit_softcapping
        logits = cap * (logits / cap).tanh()
    return logits


def nll_of_last(model, ids, num_scored: int) -> float:
    """Summed negative log-likelihood (nats) of the last `num_scored` tokens of the 1-D tensor `ids`, each predicted
    with the full preceding context of `ids`."""
    if not 1 <= num_scored < len(ids):
        raise ValueError(f"num_scored must be in [1, {len(ids) - 1}] for {len(ids)} tokens, got {num_scored}")
    return nll_at(model, ids, range(len(ids) - num_scored, len(ids)))


def nll_at(model, ids, positions) -> float:
    """Summed negative log-likelihood (nats) of the tokens of the 1-D tensor `ids` at `positions` (increasing, each
    >= 1), each predicted with the full preceding context of `ids`: one forward, and only those rows projected."""
    import torch
    import torch.nn.functional as F

    positions = torch.as_tensor(list(positions), dtype=torch.long)
    if len(positions) == 0:
        raise ValueError("positions must name at least one token")
    if int(positions.min()) < 1 or int(positions.max()) >= len(ids):
        raise ValueError(f"positions must be in [1, {len(ids) - 1}] (each token needs one before it), got "
                         f"{int(positions.min())} .. {int(positions.max())}")
    if bool((positions[1:] <= positions[:-1]).any()):
        raise ValueError("positions must be strictly increasing")
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        hidden = model.base_model(ids[None].to(device), use_cache=False).last_hidden_state[0]
        total = 0.0
        for start in range(0, len(positions), SLICE):  # position p is predicted by the hidden state at p - 1
            chunk = positions[start:start + SLICE]
            logits = _project(model, hidden[(chunk - 1).to(hidden.device)])
            total += F.cross_entropy(logits, ids[chunk].to(logits.device), reduction="sum").item()
    return total


def sliding_window_nll(model, ids, num_scored: int, window: int, stride: int | None = None,
                       progress: bool = True) -> float:
    """Summed NLL of the last `num_scored` tokens when the model never sees more than `window` tokens: the tokens
    are scored in chunks of `stride`, each chunk with the `window` tokens ending at its end, so every scored token
    has between window - stride and window tokens of context (all of them if fewer exist)."""
    from tqdm.auto import tqdm

    stride = stride or max(window // 4, 1)
    if not 1 <= stride <= window - 1:
        raise ValueError(f"stride must be in [1, window - 1 = {window - 1}], got {stride}")
    if len(ids) <= window:
        return nll_of_last(model, ids, num_scored)
    first = len(ids) - num_scored
    starts = range(first, len(ids), stride)
    total = 0.0
    for start in tqdm(starts, desc=f"{window}-token window", disable=not progress, leave=False):
        end = min(start + stride, len(ids))
        context = ids[max(0, end - window):end]
        total += nll_of_last(model, context, end - start)
    return total


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count)
