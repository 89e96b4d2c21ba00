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

from .sharding import launch_flag

# What DeepSpeed's Ulysses attention can wrap. sdpa gets no attention mask there (it would be the shard's), only
# causality: packed documents would see each other. flash_attention_2 reads document starts from position_ids.
ATTENTIONS = ("sdpa", "flash_attention_2")
MIN_ACCELERATE = "1.12"  # the first release with ParallelismConfig(sp_size=..., sp_backend="deepspeed")


@dataclass(frozen=True)
class SequenceParallelSettings:
    """What the launch asks for, once checked: sequences split over `size` processes, attention `attention`."""

    size: int
    attention: str


def _size(environ, name):
    return int(environ.get(f"PARALLELISM_CONFIG_{name}_SIZE", "1") or 1)


def sequence_parallel_settings(environ=os.environ) -> SequenceParallelSettings | None:
    """The sequence parallelism `accelerate launch` asked for, or None; a ValueError for what cannot run exactly.

    torch's context parallelism (`parallelism_config_cp_size` > 1) is refused: it cannot run on CPU processes, so
    its loss and resume were never checked here (docs/finetuning.md, "Sequence parallelism").
    """
    if not launch_flag(environ, "ACCELERATE_USE_PARALLELISM_CONFIG"):
        return None
    cp_size = _size(environ, "CP")
    if cp_size > 1:
        raise ValueError(f"parallelism_config_cp_size {cp_size}: context parallelism (torch) is not supported by "
                         "finetune (it cannot run on CPU processes, so it is untested); use sequence parallelism "
                         "(parallelism_config_sp_size with DeepSpeed, configs/deepspeed_ulysses_cpu.yaml) or "
                         "--gradient-checkpointing")
    size = _size(environ, "SP")
    if size <= 1:
        return None
    if not launch_flag(environ, "ACCELERATE_USE_DEEPSPEED"):
        raise ValueError(f"parallelism_config_sp_size {size}: sequence parallelism runs on DeepSpeed (Ulysses); set "
                         "distributed_type: DEEPSPEED in the accelerate config (configs/deepspeed_ulysses_cpu.yaml)")
    attention = environ.get("PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION", "").strip()
    if attention not in ATTENTIONS:
        raise ValueError(f"parallelism_config_sp_attn_implementation {attention or 'unset'!r}: finetune supports "
                         f"{', '.join(ATTENTIONS)} under sequence parallelism; set one in the accelerate config")
    if _size(environ, "TP") > 1:
        raise ValueError(f"parallelism_config_tp_size {_size(environ, 'TP')}: tensor parallelism is not supported by "
                         "finetune; with sequence parallelism leave it at 1")
    processes = int(environ.get("WORLD_SIZE", "1") or 1)
    data_parallel = _size(environ, "DP_REPLICATE") * _size(environ, "DP_SHARD")
    if data_parallel * size != processes:
        raise ValueError(f"parallelism_config_sp_size {size} x parallelism_config_dp_shard_size x dp_replicate_size "
                         f"{data_parallel} must equal the {processes} processes launched: set "
                         f"parallelism_config_dp_shard_size to {processes // size if processes % size == 0 else '?'}")
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


def check_options(settings: SequenceParallelSettings, opts, config):
    """Refuse options (`FinetuneOptions`) and models (their `config`) whose training under sequence parallelism
    would differ from one process's, or fail only once the model is loaded."""
    from .methods import get_method
    from .runtimes import runtime_for

    if opts.max_length % settings.size:
        raise ValueError(f"max_length {opts.max_length} must be a multiple of parallelism_config_sp_size "
                         f"{settings.size}: every process takes an equal part of each sequence")
    if opts.attn_implementation not in (None, settings.attention):
        raise ValueError(f"attn_implementation {opts.attn_implementation!r}: under sequence parallelism the attention "
                         f"is parallelism_config_sp_attn_implementation ({settings.attention!r}); leave it unset")
    if runtime_for(get_method(opts.method).HF_ROPE_TYPE) is not None:
        raise ValueError(f"method {opts.method!r} runs its own attention runtime, which DeepSpeed's Ulysses attention "
                         "cannot wrap; under sequence parallelism fine-tune with yarn, pi, ntk or longrope")
    if settings.attention == "sdpa":
        if opts.separate_documents:
            raise ValueError("separate_documents=True needs an attention that reads document starts from "
                             "position_ids; under sequence parallelism sdpa gets only causality, so packed documents "
                             "would attend to each other. Pass --no-separate-documents (documents then attend to "
                             "earlier ones, as in plain concatenation) or use parallelism_config_sp_attn_implementation:"
                             " flash_attention_2")
        window, layer_types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
        windowed = "sliding_attention" in layer_types if layer_types is not None else True  # Qwen2: off by layer
        if windowed and window is not None and window < opts.max_length:
            raise ValueError(f"{config.model_type} attends within a sliding window ({window}); under sequence "
                             "parallelism sdpa gets only causality and would attend to every earlier token: use "
                             "parallelism_config_sp_attn_implementation: flash_attention_2, or max_length <= the window")
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or \
        config.num_attention_heads
    if heads % settings.size or (kv_heads % settings.size and settings.size % kv_heads):
        raise ValueError(f"parallelism_config_sp_size {settings.size} must divide the {heads} attention heads, and "
                         f"divide or be a multiple of the {kv_heads} key/value heads: each process attends with an "
                         "equal share of them")


def gradient_scale(settings: SequenceParallelSettings, zero_optimization: dict) -> float:
    """What each process's share of the loss is scaled by, so that DeepSpeed's reduction over the group gives the
    whole sequence's gradient: 1 where it sums over the group, the group size where it averages."""
    from . import _compat

    reduction = _compat.deepspeed_sequence_parallel_reduction(zero_optimization)
    if reduction is None:
        raise ValueError("ZeRO-3 with reduce_scatter: false and contiguous_gradients: true leaves some gradients "
                         "scaled by the sequence-parallel size before deepspeed 0.20.2: set reduce_scatter: true (the "
                         "default) in the DeepSpeed config, or upgrade deepspeed")
    return float(settings.size) if reduction == "mean" else 1.0


def epoch_batches(accelerator, loader, model, skip: int, size: int):
    """This epoch's micro-batches, each one 1/size of a sequence, after the first `skip` micro-batches.

    The adapter gathers one batch from each process of the group and yields their shards in turn, so micro-batch k
    is batch k // size of process k % size: skipping whole groups happens in the prepared loader (as without
    sequence parallelism), the rest in the adapter. A new adapter per epoch, since it holds its loader's iterator.
    """
    whole, part = divmod(skip, size)
    batches = accelerator.skip_first_batches(loader, whole) if whole else loader
    return itertools.islice(accelerator.deepspeed_ulysses_dl_adapter(batches, model), part, None)


def sequence_loss(model, batch, scale: float):
    """The mean token loss over the whole sequence, which every process of the group returns, and whose gradient
    reduced over the group is the gradient of that mean (as one process computes it on the whole sequence).

    Each process backpropagates only its own shard's share (sum of its token losses / all tokens), times `scale`
    (`gradient_scale`: DeepSpeed sums or averages gradients over the group, depending on version and ZeRO stage).
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
    share = local_sum * scale
    # the value is the whole sequence's (the other shards' sums enter without gradient), the gradient this shard's
    return (share + (totals[0] - share.detach())) / totals[1]
