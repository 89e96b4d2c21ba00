"""How `finetune` reads a multi-process launch: FSDP2 on CPU processes, where accelerate cannot shard.

`accelerate launch` with an FSDP config sets `ACCELERATE_USE_FSDP=true` and the `FSDP_*` settings for every process.
On a GPU, accelerate then shards the model itself. On CPU processes (`ACCELERATE_USE_CPU=true`) it ignores them and
trains with plain DDP over gloo: accelerate 1.15 makes a multi-process CPU run `MULTI_CPU`, never `FSDP`. Yet
torch's own FSDP2 (`torch.distributed.fsdp.fully_shard`) runs on CPU processes over gloo. So when the launcher asked
for FSDP and accelerate is on CPU processes, `finetune` shards the model with `fully_shard` here, from the same
settings, and keeps accelerate for everything else (process group, data sharding, RNG, checkpoints).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# FSDP settings accelerate launch passes on (accelerate/utils/launch.py) that CPU sharding can honour, and the values
# it can honour; anything else is refused rather than silently ignored.
SUPPORTED_WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "NO_WRAP")


def launch_flag(environ, name, default="false"):
    """A true/false setting `accelerate launch` passes in the environment."""
    return environ.get(name, default).strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class CpuShardingSettings:
    """What the launcher's FSDP config asks for, as far as `fully_shard` on CPU processes applies it."""

    reshard_after_forward: bool
    wrap_policy: str
    layer_classes: tuple  # class names sharded one by one; empty: the model's own `_no_split_modules`


def cpu_sharding_settings(distributed_type: str, mixed_precision: str, environ=os.environ) -> CpuShardingSettings | None:
    """The FSDP2 settings to apply ourselves, or None when accelerate shards (GPU) or no FSDP was asked for.

    `distributed_type` is accelerate's (`accelerator.distributed_type.name`), `mixed_precision` the one in effect,
    `environ` what `accelerate launch` set. Raises a ValueError for FSDP settings this path cannot honour.
    """
    if not launch_flag(environ, "ACCELERATE_USE_FSDP", "false") or distributed_type != "MULTI_CPU":
        return None
    version = environ.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise ValueError(f"FSDP on CPU processes runs torch's FSDP2 (fully_shard) only; the accelerate config asks "
                         f"for fsdp_version {version}: set `fsdp_version: 2` in its fsdp_config")
    if launch_flag(environ, "FSDP_OFFLOAD_PARAMS", "false"):
        raise ValueError("fsdp_offload_params: true has nothing to offload to on CPU processes; set it to false")
    if launch_flag(environ, "FSDP_ACTIVATION_CHECKPOINTING", "false"):
        raise ValueError("fsdp_activation_checkpointing is not applied on CPU processes; set it to false and pass "
                         "--gradient-checkpointing (transformers' own) instead")
    if mixed_precision != "no":
        raise ValueError(f"FSDP on CPU processes trains in float32 only; mixed precision is {mixed_precision!r}: set "
                         "mixed_precision: 'no' in the accelerate config (and --mixed-precision no)")
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    if reshard not in ("true", "false"):
        raise ValueError(f"fsdp_reshard_after_forward must be true or false for FSDP2, got {reshard!r}")
    state_dict_type = environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT").strip()
    if state_dict_type != "FULL_STATE_DICT":
        raise ValueError(f"fsdp_state_dict_type {state_dict_type!r}: on CPU processes training checkpoints hold the "
                         "gathered (full) state; leave it unset or FULL_STATE_DICT")
    if environ.get("FSDP_IGNORED_MODULES", "").strip():
        raise ValueError("fsdp_ignored_modules is not supported on CPU processes; remove it")
    policy = environ.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP").strip()  # accelerate's default, too
    if policy not in SUPPORTED_WRAP_POLICIES:
        raise ValueError(f"fsdp_auto_wrap_policy {policy!r} is not supported on CPU processes; use one of "
                         f"{', '.join(SUPPORTED_WRAP_POLICIES)}")
    classes = tuple(c.strip() for c in environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    return CpuShardingSettings(reshard_after_forward=reshard == "true", wrap_policy=policy, layer_classes=classes)


def shard_model(model, settings: CpuShardingSettings):
    """`fully_shard` every decoder layer (as accelerate's TRANSFORMER_BASED_WRAP does), then the whole model, and
    give every process the main process's weights.

    Why the broadcast: with `fsdp_cpu_ram_efficient_loading` (accelerate's FSDP2 default in some releases),
    transformers loads the checkpoint on the main process only and leaves the others with freshly initialised
    weights, which accelerate's own FSDP then overwrites from rank 0. Sharding without that would keep each
    process's shard of different weights.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    loaded = model.state_dict() if dist.get_rank() == 0 else {}
    if settings.wrap_policy == "TRANSFORMER_BASED_WRAP":
        names = set(settings.layer_classes or getattr(model, "_no_split_modules", None) or ())
        # innermost first, as accelerate does: a class nested in another named one is sharded before its parent
        layers = [m for m in reversed(list(model.modules())) if type(m).__name__ in names]
        if not layers:
            raise ValueError(f"no layer of class {sorted(names)} to shard in {type(model).__name__}; name the "
                             "decoder layer class in fsdp_transformer_layer_cls_to_wrap or use NO_WRAP")
        for layer in layers:
            fully_shard(layer, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(model, reshard_after_forward=settings.reshard_after_forward)
    set_model_state_dict(model, loaded, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():  # not in the state dict when non-persistent (rotary frequencies): plain tensors
        dist.broadcast(buffer, src=0)
    return model


class ShardedTrainingState:
    """Model and optimizer of a sharded run, for `accelerator.register_for_checkpointing`.

    accelerate calls a registered object's `state_dict()` on every process (here a collective that gathers the full,
    unsharded model and optimizer state on the main process) and writes the main process's result; on load every
    process reads that file and takes its own shards back.
    """

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"model": model, "optimizer": optimizer}

    def load_state_dict(self, state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))


def full_model_state_dict(model):
    """The unsharded weights on the main process (empty on the others): a collective, every process calls it.

    Tied weights (input embeddings and LM head of SmolLM2) come back as one tensor (`retie`).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return retie(state, model)


def retie(state: dict, model) -> dict:
    """Make tied weights one tensor again in a gathered state dict (FSDP2 and DeepSpeed gather them once per name),
    so that `save_pretrained` recognises the tie and writes the weight once."""
    if state:
        first_name = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            first = first_name.setdefault(id(param), name)
            if first != name and name in state and first in state:
                state[name] = state[first]
    return state


def full_tensor(value):
    """A plain tensor from what a sharded computation returns (a replicated DTensor, e.g. the gradient norm)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value
