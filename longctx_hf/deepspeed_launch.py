"""How `finetune` reads a DeepSpeed launch: the process group on CPU-only machines, and a DeepSpeed config that
agrees with finetune's options.

DeepSpeed, not the training loop, accumulates gradients, clips them, and (with a config section for them) builds
the optimizer, the learning-rate schedule and the mixed precision. A config that disagrees with finetune's options
would silently win, so it is made to agree ('auto' values) or refused, before the model is loaded.
"""
from __future__ import annotations

import os

from .sharding import launch_flag

# the names DeepSpeed accepts for "gather ZeRO-3's weights into one state dict on save" (the last one deprecated)
GATHER_ON_SAVE = ("stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save",
                  "stage3_gather_fp16_weights_on_model_save")


def process_group_kwargs(environ=os.environ) -> list:
    """accelerate's kwargs handlers for this launch: the gloo backend for DeepSpeed on a machine without a GPU.

    accelerate (1.15, 1.16) takes the process-group backend from the accelerator; with none, a DeepSpeed launch gets
    no backend, and every process runs alone (`num_processes` 1). DeepSpeed itself runs on CPU processes over gloo
    (its CPU accelerator), which is what these processes are then given.
    """
    import torch
    from accelerate.utils import InitProcessGroupKwargs

    if launch_flag(environ, "ACCELERATE_USE_DEEPSPEED") and not torch.accelerator.is_available():
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def settle_deepspeed_config(config: dict, batch_size: int, grad_accum: int, max_grad_norm: float,
                            mixed_precision: str | None, effective_mixed_precision: str):
    """Make the DeepSpeed config (accelerate's plugin's, changed in place) agree with finetune's options, or refuse.

    'auto' (or unset) takes the option's value; the micro-batch size is filled in because under sequence
    parallelism the model is prepared without the data loader, which is where accelerate would read it. accelerate
    fills a gradient_accumulation_steps that a config file leaves out with 1.
    """
    for key, value in (("train_micro_batch_size_per_gpu", batch_size), ("gradient_accumulation_steps", grad_accum),
                       ("gradient_clipping", max_grad_norm)):
        configured = config.get(key, "auto")
        if configured != "auto" and configured != value:
            raise ValueError(f"the DeepSpeed config's {key} is {configured}, but finetune's option is {value}: make "
                             "them equal (or set it to 'auto')")
        config[key] = value
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(f"the DeepSpeed config's {section!r} section: finetune builds the optimizer (AdamW) "
                             "and the learning-rate schedule itself (--learning-rate, --lr-scheduler, --warmup-steps); "
                             "remove the section")
    if mixed_precision is not None and mixed_precision != effective_mixed_precision:
        raise ValueError(f"mixed_precision {mixed_precision!r}, but the DeepSpeed config trains in "
                         f"{effective_mixed_precision!r}: make them agree (its bf16/fp16 sections)")
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not any(zero.get(key, False) is True for key in GATHER_ON_SAVE):
        raise ValueError("ZeRO-3 without zero3_save_16bit_model: true (stage3_gather_16bit_weights_on_model_save) "
                         "cannot gather the weights for the final checkpoint; set it in the DeepSpeed config")
