"""Sequence parallelism for `finetune`: DeepSpeed Ulysses (ALST) through accelerate's parallelism config.

With `parallelism_config_sp_size: N` in a DeepSpeed launch config, accelerate (>= 1.12) registers DeepSpeed's
Ulysses attention with transformers (an all-to-all gives every process all positions of 1/N of the heads) and its
data-loader adapter hands each of the N processes 1/N of every sequence, with `shift_labels` in place of `labels`.
The model then returns no loss, and what each process could compute is the loss of its own shard only. This module
adds what the training loop needs for the result to equal one process training on whole sequences: the checks of a
launch it can run exactly, the loss over the whole sequence, and the adapter around each epoch's batches (so that a
resumed run skips the batches already trained on).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

# What DeepSpeed's Ulysses attention can wrap. sdpa gets no attention mask there (it would be the shard's), only
# causality: packed documents would see each other. flash_attention_2 reads document starts from position_ids.
ATTENTIONS = ("sdpa", "flash_attention_2")
MIN_ACCELERATE = "1.12"  # the first release with ParallelismConfig(sp_size=..., sp_backend="deepspeed")


def _flag(environ, name):
    return environ.get(name, "false").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class SequenceParallelSettings:
    """What the launch asks for, once checked: sequences split over `size` processes, attention `attention`."""

    size: int
    attention: str


def sequence_parallel_settings(environ=os.environ) -> SequenceParallelSettings | None:
    """The sequence parallelism `accelerate launch` asked for, or None; a ValueError for what cannot run exactly.

    torch's context parallelism (`parallelism_config_cp_size` > 1) is refused: it cannot run on CPU processes, so
    its loss and resume were never checked here (docs/finetuning.md, "Sequence parallelism").
    """
    if not _flag(environ, "ACCELERATE_USE_PARALLELISM_CONFIG"):
        return None
    cp_size = int(environ.get("PARALLELISM_CONFIG_CP_SIZE", "1") or 1)
    if cp_size > 1:
        raise ValueError(f"parallelism_config_cp_size {cp_size}: context parallelism (torch) is not supported by "
                         "finetune (it cannot run on CPU processes, so it is untested); use sequence parallelism "
                         "(parallelism_config_sp_size with DeepSpeed, configs/deepspeed_ulysses_cpu.yaml) or "
                         "--gradient-checkpointing")
    size = int(environ.get("PARALLELISM_CONFIG_SP_SIZE", "1") or 1)
    if size <= 1:
        return None
    if not _flag(environ, "ACCELERATE_USE_DEEPSPEED"):
        raise ValueError(f"parallelism_config_sp_size {size}: sequence parallelism runs on DeepSpeed (Ulysses); set "
                         "distributed_type: DEEPSPEED in the accelerate config (configs/deepspeed_ulysses_cpu.yaml)")
    attention = environ.get("PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION", "sdpa").strip()
    if attention not in ATTENTIONS:
        raise ValueError(f"parallelism_config_sp_attn_implementation {attention!r}: finetune supports "
                         f"{', '.join(ATTENTIONS)} under sequence parallelism")
    _check_versions()
    return SequenceParallelSettings(size=size, attention=attention)


def _check_versions():
    import importlib.metadata
    import importlib.util

    from packaging.version import Version

    if Version(importlib.metadata.version("accelerate")) < Version(MIN_ACCELERATE):
        raise ValueError(f"sequence parallelism needs accelerate >= {MIN_ACCELERATE} (parallelism_config_sp_size); "
                         f"this is accelerate {importlib.metadata.version('accelerate')}")
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("sequence parallelism runs on DeepSpeed, which is not installed: pip install deepspeed "
                         "(on a CPU-only machine: pip install --no-build-isolation deepspeed, after torch)")


def check_options(settings: SequenceParallelSettings, max_length: int, separate_documents: bool,
                  attn_implementation: str | None):
    """Refuse options whose result under sequence parallelism would differ from one process's."""
    if max_length % settings.size:
        raise ValueError(f"max_length {max_length} must be a multiple of parallelism_config_sp_size {settings.size}: "
                         "every process takes an equal part of each sequence")
    if attn_implementation not in (None, settings.attention):
        raise ValueError(f"attn_implementation {attn_implementation!r}: under sequence parallelism the attention is "
                         f"parallelism_config_sp_attn_implementation ({settings.attention!r}); leave it unset")
    if separate_documents and settings.attention == "sdpa":
        raise ValueError("separate_documents=True needs an attention that reads document starts from position_ids; "
                         "under sequence parallelism sdpa gets only causality, so packed documents would attend to "
                         "each other. Pass --no-separate-documents (documents then attend to earlier ones, as in "
                         "plain concatenation) or use parallelism_config_sp_attn_implementation: flash_attention_2")


def epoch_batches(accelerator, loader, model, skip: int, size: int):
    """This epoch's micro-batches, each one 1/size of a sequence, after the first `skip` micro-batches.

    The adapter gathers one batch from each process of the group and yields their shards in turn, so micro-batch k
    is batch k // size of process k % size: skipping whole groups happens in the prepared loader (as without
    sequence parallelism), the rest in the adapter. A new adapter per epoch, since it holds its loader's iterator.
    """
    whole, part = divmod(skip, size)
    batches = accelerator.skip_first_batches(loader, whole) if whole else loader
    return itertools.islice(accelerator.deepspeed_ulysses_dl_adapter(batches, model), part, None)


def sequence_loss(model, batch, zero_stage: int, size: int):
    """The mean token loss over the whole sequence, which every process of the group returns, and whose gradient
    summed over the group is the gradient of that mean (as one process computes it on the whole sequence).

    Each process backpropagates only its own shard's share (sum of its token losses / all tokens); DeepSpeed then
    sums gradients over the group, except ZeRO-3 before deepspeed 0.20.2, which averages them
    (`_compat.deepspeed_averages_sequence_parallel_gradients`): there the share is scaled by the group size.
    """
    import torch
    import torch.nn.functional as F

    from . import _compat

    shift_labels = batch.pop("shift_labels")
    logits = model(**batch).logits
    local_sum = F.cross_entropy(logits.float().flatten(0, 1), shift_labels.flatten(), ignore_index=-100,
                                reduction="sum")
    local_tokens = (shift_labels != -100).sum()
    totals = torch.stack((local_sum.detach(), local_tokens.to(local_sum.dtype)))
    torch.distributed.all_reduce(totals, group=_compat.deepspeed_sequence_parallel_group())
    if _compat.deepspeed_averages_sequence_parallel_gradients(zero_stage):
        local_sum = local_sum * size
    # the value is the whole sequence's (the other shards' sums enter without gradient), the gradient this shard's
    return (local_sum + (totals[0] - local_sum.detach())) / totals[1]
