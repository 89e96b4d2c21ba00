"""Fine-tune after extending: `extend_context`, then a plain accelerate training loop.

Everything distributed (DDP, FSDP, DeepSpeed, mixed precision) is accelerate's: the same code runs as a plain
process and under `accelerate launch --config_file configs/...`. Output is an HF checkpoint with the extension in
its config (LoRA merged in), the tokenizer, and a `trainer_state.json` like HF Trainer's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

ATTN_IMPLEMENTATIONS = (None, "sdpa", "eager", "flash_attention_2")
MIXED_PRECISION = (None, "no", "bf16", "fp16")
# our name -> transformers' scheduler name (all of them warm up linearly first)
LR_SCHEDULERS = {"linear": "linear", "constant": "constant_with_warmup", "cosine": "cosine"}
STATE_FILE = "trainer_state.json"
PROCESSES_FILE = "processes.json"  # in checkpoint-N: how its processes shared the work (FinetuneResult.distributed)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# processes whose training checkpoints only the same kind of run reads back (FinetuneResult.distributed)
OWN_LAYOUT = ("FSDP2_CPU", "DEEPSPEED")


def _int(name, value, minimum, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


@dataclass(frozen=True)
class FinetuneOptions:
    """Every option of `finetune`, validated on construction (before any model or data is loaded)."""

    model: str
    method: str
    output_dir: str
    data: str
    max_length: int
    steps: int
    factor: float | None = None
    target_length: int | None = None
    method_options: dict = field(default_factory=dict)
    learning_rate: float = 2e-5
    warmup_steps: int | None = None  # None: min(20, steps // 10)
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 1
    grad_accum: int = 1
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: 2 * lora_rank
    lora_train_embeddings_and_norms: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    separate_documents: bool = True
    mixed_precision: str | None = None  # None: what `accelerate launch` / its config says, else "no"
    logging_steps: int = 1
    save_steps: int | None = None
    resume_from: str | None = None
    seed: int = 0
    text_column: str = "text"
    progress_bar: bool = True

    def __post_init__(self):
        from .data import check_data_source

        for name in ("model", "method", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise TypeError(f"{name} must be a non-empty string or path, got {value!r}")
        check_data_source(self.data)
        _int("max_length", self.max_length, 2)
        _int("steps", self.steps, 1)
        if (self.factor is None) == (self.target_length is None):
            raise ValueError("give exactly one of factor (> 1, relative to the pretrained context) or target_length")
        if self.factor is not None and (isinstance(self.factor, bool) or not isinstance(self.factor, (int, float))):
            raise TypeError(f"factor must be a number, got {type(self.factor).__name__} {self.factor!r}")
        _int("target_length", self.target_length, 1, allow_none=True)
        if not isinstance(self.method_options, dict):
            raise TypeError(f"method_options must be a dict, got {type(self.method_options).__name__}")
        for name in ("learning_rate", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (name == "learning_rate" and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'learning_rate' else '>= 0'}, "
                                 f"got {value!r}")
        _int("warmup_steps", self.warmup_steps, 0, allow_none=True)
        if self.warmup_steps is not None and self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps must be <= steps ({self.steps}), got {self.warmup_steps}")
        _choice("lr_scheduler", self.lr_scheduler, tuple(LR_SCHEDULERS))
        for name in ("batch_size", "grad_accum", "lora_rank", "logging_steps"):
            _int(name, getattr(self, name), 1)
        _int("save_steps", self.save_steps, 1, allow_none=True)
        _int("seed", self.seed, 0)
        for name in ("lora", "lora_train_embeddings_and_norms", "gradient_checkpointing", "separate_documents",
                     "progress_bar"):
            _bool(name, getattr(self, name))
        if self.lora_train_embeddings_and_norms and not self.lora:
            raise ValueError("lora_train_embeddings_and_norms needs lora=True (without LoRA everything is trained)")
        if self.lora_alpha is not None and (isinstance(self.lora_alpha, bool)
                                            or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0):
            raise ValueError(f"lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if self.lora and not _package_installed("peft"):
            raise ValueError("lora=True needs the package `peft` (pip install 'longctx-hf[lora]')")
        _choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        if self.attn_implementation == "flash_attention_2" and not _package_installed("flash_attn"):
            raise ValueError("attn_implementation='flash_attention_2' needs the package `flash-attn` (and a GPU); "
                             "use 'sdpa' here")
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        self._check_output_and_resume()

    def _check_output_and_resume(self):
        output = Path(self.output_dir)
        if output.exists() and not output.is_dir():
            raise ValueError(f"output_dir {str(output)!r} exists and is not a folder")
        entries = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
        resume_step = 0
        if self.resume_from is not None:
            resume = Path(self.resume_from)
            if not (resume / STATE_FILE).is_file():
                raise ValueError(f"resume_from {str(resume)!r} is not a checkpoint folder (no {STATE_FILE}); "
                                 "give one of the checkpoint-N folders written with save_steps")
            resume_step = _read_state(resume).global_step
            if resume_step >= self.steps:
                raise ValueError(f"resume_from is at step {resume_step}; steps must exceed it, got {self.steps}")
        # Only our own earlier checkpoints may be in the way, and only when resuming from one of them.
        own = output.resolve() == Path(self.resume_from).resolve().parent if self.resume_from else False
        later = [e for e in entries if _CHECKPOINT.match(e) and int(_CHECKPOINT.match(e).group(1)) > resume_step]
        if entries and (not own or later or any(not _CHECKPOINT.match(e) for e in entries)):
            raise ValueError(f"output_dir {str(output)!r} is not empty; give a new folder (nothing is overwritten)"
                             + (f"; it holds checkpoints after step {resume_step}: {later}" if own and later else ""))

    @property
    def resolved_warmup_steps(self) -> int:
        return min(20, self.steps // 10) if self.warmup_steps is None else self.warmup_steps


def _package_installed(name) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _read_state(folder):
    from transformers import TrainerState

    return TrainerState.load_from_json(str(Path(folder) / STATE_FILE))


@dataclass
class FinetuneResult:
    output_dir: str
    model: object  # the trained model in memory (LoRA merged), as saved
    log_history: list
    is_main_process: bool = True
    # how the processes shared the work: accelerate's distributed type ("NO", "MULTI_CPU" = DDP, "FSDP", ...), or
    # "FSDP2_CPU" when this package sharded CPU processes itself (longctx_hf/sharding.py). Under FSDP, `model` is
    # the sharded module: reload the saved folder for a plain one.
    distributed: str = "NO"


def finetune(model, **options) -> FinetuneResult:
    """Extend `model` (a folder, Hub id or "smollm2") with `method`, fine-tune it, save it to `output_dir`.

    See `FinetuneOptions` for the options; they are all validated (and the extension is tried on a meta-device
    copy of the model) before any weights or data are loaded.
    """
    return run(check_options(model, **options))


def check_options(model, **options) -> FinetuneOptions:
    """Validated options: types and ranges, data and output folders, and the extension itself on a meta copy."""
    from .methods import ALIASES, METHODS

    method = METHODS.get(ALIASES.get(options.get("method"), options.get("method"))) \
        if isinstance(options.get("method"), str) else None
    if method is not None and method.KIND != "rope":
        raise ValueError(f"method {method.NAME!r} is not supported by finetune yet (it takes no factor); build the "
                         "model with longctx_hf.alibi_model_from_config or extend_context and train it directly")
    if method is not None and method.TRAINING_FREE:
        raise ValueError(f"method {method.NAME!r} is training-free (its attention is not built for backward passes "
                         "at long lengths); fine-tune with yarn, pi or ntk instead")
    try:
        opts = FinetuneOptions(model=model, **options)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            allowed = ", ".join(f.name for f in dataclasses.fields(FinetuneOptions) if f.name != "model")
            raise TypeError(f"{err}; finetune takes {allowed}") from None
        raise
    _check_extension(opts)
    return opts


def _check_extension(opts):
    """Run the extension on a meta-device copy: a bad method, factor, option or max_length fails in milliseconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .patch import context_info, extend_context
    from .real_model import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(str(opts.model)))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    extend_context(skeleton, opts.method, opts.factor, target_length=opts.target_length, **opts.method_options)
    extended = context_info(skeleton).extended_length
    if opts.max_length > extended:
        raise ValueError(f"max_length {opts.max_length} exceeds the extended context {extended}; "
                         "raise factor/target_length or lower max_length")


def _add_lora(model, opts):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_alpha or 2 * opts.lora_rank, lora_dropout=0.0,
                        target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if opts.lora_train_embeddings_and_norms:
        # LongLoRA (2309.12307): LoRA alone does not adapt to long context unless embeddings and norms also train.
        # They are base weights trained in place, so merge_and_unload keeps them as they are.
        base = model.get_base_model()
        trainable = [base.get_input_embeddings()] + [m for m in base.modules() if "norm" in type(m).__name__.lower()]
        for module in trainable:
            for param in module.parameters(recurse=False):
                param.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise RuntimeError("LoRA left no trainable parameter")
    return model


def _load_for_training(opts, model_path, attn_implementation):
    """The extended model ready to train (float32 weights; autocast comes from accelerate), and its use_cache."""
    import torch

    from . import _compat
    from .patch import extend_context, from_pretrained

    model = from_pretrained(model_path, dtype=torch.float32, attn_implementation=attn_implementation)
    extend_context(model, opts.method, opts.factor, target_length=opts.target_length, **opts.method_options)
    use_cache = model.config.use_cache
    model.config.use_cache = False  # also what lets transformers read packed documents from position_ids
    if opts.gradient_checkpointing:
        _compat.enable_activation_checkpointing(model, use_reentrant=False)
    if opts.lora:
        model = _add_lora(model, opts)
    model.train()
    return model, use_cache


def run(opts: FinetuneOptions) -> FinetuneResult:
    """Train with already checked options (see `check_options`)."""
    import torch
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, TrainerState, get_scheduler

    from . import sequence_parallel as sp
    from .data import packed_dataset
    from .real_model import resolve_model
    from .sharding import full_tensor, shard_model

    model_path = resolve_model(str(opts.model))
    processes = _launch(opts, model_path)
    accelerator, sharding, sequence_parallel = processes.accelerator, processes.sharding, processes.sequence_parallel
    set_seed(opts.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = packed_dataset(opts.data, tokenizer, opts.max_length, opts.separate_documents, opts.text_column)

    # under sequence parallelism the attention DeepSpeed's Ulysses wraps
    attn_implementation = sequence_parallel.attention if sequence_parallel else opts.attn_implementation
    model, use_cache = _load_for_training(opts, model_path, attn_implementation)
    if sharding:
        model = shard_model(model, sharding)  # before the optimizer is built: it must hold the sharded parameters

    trainable = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel, as HF Trainer's default optimizer on torch >= 2.8 ("adamw_torch_fused"); with the default
    # foreach kernel this loop ran at 0.95-0.97x the Trainer's tokens/s (SmolLM2, 512 tokens, CPU). Not under
    # FSDP/DeepSpeed, which shard or replace the parameters.
    fused = accelerator.distributed_type.name not in ("FSDP", "DEEPSPEED") and sharding is None
    optimizer = torch.optim.AdamW(trainable, lr=opts.learning_rate, weight_decay=opts.weight_decay, fused=fused)
    scheduler = get_scheduler(LR_SCHEDULERS[opts.lr_scheduler], optimizer, num_warmup_steps=opts.resolved_warmup_steps, num_training_steps=opts.steps)
    loader = torch.utils.data.DataLoader(dataset, batch_size=opts.batch_size, shuffle=True, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"the data packs into {len(dataset)} blocks, fewer than batch_size={opts.batch_size}")
    model, optimizer, loader = _prepare(processes, model, optimizer, loader)
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP replaces parameters in prepare
    # The scheduler is stepped once per optimizer step by hand (not prepared: accelerate would step it once per
    # process), and saved with the rest of the state.
    accelerator.register_for_checkpointing(scheduler)

    state = TrainerState(max_steps=opts.steps, logging_steps=opts.logging_steps, save_steps=opts.save_steps or 0,
                         train_batch_size=opts.batch_size, num_train_epochs=0,
                         is_local_process_zero=accelerator.is_local_main_process,
                         is_world_process_zero=accelerator.is_main_process)
    if opts.resume_from:
        accelerator.load_state(opts.resume_from)
        state = _read_state(opts.resume_from)
        state.max_steps = opts.steps
    # Under sequence parallelism a micro-batch is 1/size of a sequence on every process of its group.
    micro_batches_per_epoch = len(loader) * processes.sequence_parallel_size
    data_parallel = processes.data_parallel
    tokens_per_micro_batch = opts.batch_size * opts.max_length * data_parallel
    micro_done = state.global_step * opts.grad_accum
    epoch, skip = divmod(micro_done, micro_batches_per_epoch)

    bar = tqdm(total=opts.steps, initial=state.global_step, desc="finetune", unit="step",
               disable=not (opts.progress_bar and accelerator.is_local_main_process))
    # The loss is summed on the device (no host sync per micro-batch) and averaged over processes when logged.
    window_loss = torch.zeros((), dtype=torch.float32, device=accelerator.device)
    window_micro, started, tokens_run = 0, time.perf_counter(), 0
    all_loss, all_micro = 0.0, 0
    grad_norm = None
    while state.global_step < opts.steps:
        loader.set_epoch(epoch)
        if sequence_parallel:
            batches = sp.epoch_batches(accelerator, loader, model, skip, processes.sequence_parallel_size)
        else:
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            with accelerator.accumulate(model):
                if sequence_parallel:
                    loss = sp.sequence_loss(model, batch, processes.gradient_scale)
                else:
                    loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # explicit: the optimizer is not accelerate's when sharded here
                    if opts.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(trainable, opts.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
            window_loss += loss.detach().float()
            window_micro += 1
            tokens_run += tokens_per_micro_batch
            if not accelerator.sync_gradients:
                continue
            learning_rate = scheduler.get_last_lr()[0]
            scheduler.step()
            state.global_step += 1
            micro_done += opts.grad_accum
            state.epoch = micro_done / micro_batches_per_epoch
            state.num_input_tokens_seen += opts.grad_accum * tokens_per_micro_batch
            bar.update(1)
            if state.global_step % opts.logging_steps == 0 or state.global_step == opts.steps:
                mean_loss = accelerator.reduce(window_loss / window_micro, "mean").item()
                all_loss, all_micro = all_loss + mean_loss * window_micro, all_micro + window_micro
                window_loss.zero_()
                window_micro = 0
                entry = {"loss": round(mean_loss, 6), "learning_rate": learning_rate, "step": state.global_step,
                         "epoch": round(state.epoch, 6)}
                if grad_norm is not None:
                    entry["grad_norm"] = float(full_tensor(grad_norm))
                state.log_history.append(entry)
                tokens_per_second = tokens_run / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tokens_per_second:.0f}")
            if opts.save_steps and state.global_step % opts.save_steps == 0 and state.global_step < opts.steps:
                _save_checkpoint(accelerator, state, Path(opts.output_dir) / f"checkpoint-{state.global_step}",
                                 processes.layout)
            if state.global_step >= opts.steps:
                break
        epoch += 1
    bar.close()

    runtime = time.perf_counter() - started
    steps_run = max(1, opts.steps - (_read_state(opts.resume_from).global_step if opts.resume_from else 0))
    state.log_history.append({
        "step": state.global_step, "epoch": round(state.epoch, 6), "train_runtime": round(runtime, 4),
        "train_loss": all_loss / max(all_micro, 1), "train_tokens_per_second": round(tokens_run / runtime, 3),
        "train_samples_per_second": round(steps_run * opts.grad_accum * opts.batch_size * data_parallel / runtime, 3),
        "train_steps_per_second": round(steps_run / runtime, 3)})
    trained = _save_final(accelerator, model, tokenizer, state, opts, use_cache, sharded=sharding is not None)
    return FinetuneResult(output_dir=str(opts.output_dir), model=trained, log_history=state.log_history,
                          is_main_process=accelerator.is_main_process,
                          distributed=processes.distributed)


@dataclass(frozen=True)
class Processes:
    """How this run's processes share the work: read from the launch and checked before anything is loaded."""

    accelerator: object
    sharding: object  # sharding.CpuShardingSettings when FSDP2 is applied here on CPU processes, else None
    sequence_parallel: object  # sequence_parallel.SequenceParallelSettings, or None
    gradient_scale: float  # each process's share of the loss is scaled by it under sequence parallelism

    @property
    def distributed(self) -> str:
        return "FSDP2_CPU" if self.sharding else self.accelerator.distributed_type.name

    @property
    def sequence_parallel_size(self) -> int:
        """How many processes split each sequence (1: every process holds whole sequences)."""
        return self.sequence_parallel.size if self.sequence_parallel else 1

    @property
    def data_parallel(self) -> int:
        """How many sequences (micro-batches) the processes take per micro-step between them."""
        return self.accelerator.num_processes // self.sequence_parallel_size

    @property
    def layout(self) -> dict:
        """What a training checkpoint records (processes.json), and what resuming it needs: the same kind of
        processes, and the same split of every step's sequences over them (the batches to skip depend on it)."""
        return {"distributed": self.distributed, "sequence_parallel": self.sequence_parallel_size,
                "data_parallel": self.data_parallel}


def _launch(opts, model_path) -> Processes:
    """The accelerator for this launch, with every check of the launch against the options done."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import GradientAccumulationPlugin
    from transformers import AutoConfig

    from . import sequence_parallel as sp
    from .deepspeed_launch import process_group_kwargs, settle_deepspeed_config
    from .sharding import cpu_sharding_settings

    sequence_parallel = sp.sequence_parallel_settings()
    if sequence_parallel:
        sp.check_options(sequence_parallel, opts, AutoConfig.from_pretrained(model_path))
    accelerator = Accelerator(
        mixed_precision=opts.mixed_precision,
        # One optimizer step = exactly grad_accum micro-batches, across epoch ends too (so resume can count).
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=opts.grad_accum, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=process_group_kwargs(),
    )
    _check_process_count(accelerator)
    if sequence_parallel and accelerator.distributed_type.name != "DEEPSPEED":
        raise ValueError(f"parallelism_config_sp_size {sequence_parallel.size}: accelerate runs these processes as "
                         f"{accelerator.distributed_type.name}, not DEEPSPEED; launch without ACCELERATE_USE_CPU")
    gradient_scale = 1.0
    if accelerator.distributed_type.name == "DEEPSPEED":
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        settle_deepspeed_config(config, opts.batch_size, opts.grad_accum, opts.max_grad_norm, opts.mixed_precision,
                                accelerator.mixed_precision)
        if sequence_parallel:
            gradient_scale = sp.gradient_scale(sequence_parallel, config.get("zero_optimization", {}))
    sharding = cpu_sharding_settings(accelerator.distributed_type.name, accelerator.mixed_precision)
    processes = Processes(accelerator, sharding, sequence_parallel, gradient_scale)
    if opts.resume_from:
        _check_resume_layout(Path(opts.resume_from), processes.layout)
    if opts.lora and (accelerator.distributed_type.name in ("FSDP", "DEEPSPEED") or sharding):
        raise ValueError(f"lora=True is not supported under {'FSDP' if sharding else accelerator.distributed_type.name}"
                         ": merging needs the full adapters on one process; fine-tune without LoRA there")
    return processes


def _prepare(processes: Processes, model, optimizer, loader):
    """accelerate's prepare, as each way of sharing the work needs it."""
    from .sharding import ShardedTrainingState

    accelerator = processes.accelerator
    if processes.sharding:
        # accelerate would wrap the sharded model in DDP and save only the main process's optimizer shards: it
        # prepares the data only, and saves model and optimizer through a gathered state.
        accelerator.register_for_checkpointing(ShardedTrainingState(model, optimizer))
        return model, optimizer, accelerator.prepare(loader)
    if processes.sequence_parallel:
        # The data apart from the model, so that each epoch gets its own sequence-sharding adapter (sp.epoch_batches)
        model, optimizer = accelerator.prepare(model, optimizer)
        return model, optimizer, accelerator.prepare(loader)
    return accelerator.prepare(model, optimizer, loader)


def _check_process_count(accelerator):
    """Refuse a launch whose processes do not form one job: each would train on all the data and write the output.

    That is what accelerate does when launched for GPUs on a machine without one: every process runs alone.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise ValueError(f"launched as {launched} processes, but accelerate runs them as {accelerator.num_processes} "
                         f"({accelerator.distributed_type.name}): each would train on all the data and write the same "
                         "output. On CPU processes DDP and FSDP2 run with ACCELERATE_USE_CPU=true (configs/cpu_2proc.yaml,"
                         " configs/fsdp_cpu.yaml), DeepSpeed without it (configs/deepspeed_ulysses_cpu.yaml)")


def _check_resume_layout(folder: Path, layout: dict):
    """A checkpoint of a run sharded here (FSDP2_CPU) holds gathered state that only such a run reads back, one of
    DeepSpeed its engine's shards, and the other way round; and a run that splits sequences over N processes counts
    its micro-batches in sequences shared by N. Refused before loading instead of failing inside accelerate's
    load_state, or skipping the wrong batches."""
    marker = folder / PROCESSES_FILE
    written = json.loads(marker.read_text()) if marker.is_file() else {}
    distributed, written_distributed = layout["distributed"], written.get("distributed")
    if (written_distributed in OWN_LAYOUT or distributed in OWN_LAYOUT) and written_distributed != distributed:
        raise ValueError(f"resume_from {str(folder)!r} was written by a run with processes "
                         f"{written_distributed or 'NO or MULTI_CPU'}; this run's are {distributed}: resume it with "
                         "the launch configuration that wrote it")
    if written.get("sequence_parallel", 1) != layout["sequence_parallel"]:
        raise ValueError(f"resume_from {str(folder)!r} was written by a run that split every sequence over "
                         f"{written.get('sequence_parallel', 1)} processes; this run splits them over "
                         f"{layout['sequence_parallel']}: resume it with the launch configuration that wrote it")
    if written.get("data_parallel", layout["data_parallel"]) != layout["data_parallel"]:  # unrecorded before
        raise ValueError(f"resume_from {str(folder)!r} was written by a run whose steps took sequences from "
                         f"{written['data_parallel']} processes (data parallel); this run's take them from "
                         f"{layout['data_parallel']}, so it would skip other batches than those already trained on: "
                         "resume it with the same number of processes")


def _save_checkpoint(accelerator, state, folder: Path, layout: dict):
    """accelerate's full training state (model, optimizer, scheduler, RNG, sampler) plus our trainer_state.json and
    the processes' layout."""
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        state.save_to_json(str(folder / STATE_FILE))
        (folder / PROCESSES_FILE).write_text(json.dumps(layout) + "\n")
    accelerator.wait_for_everyone()


def _save_final(accelerator, model, tokenizer, state, opts, use_cache, sharded):
    """One HF checkpoint, written by the main process into a staging folder and then moved into place."""
    from . import _compat
    from .sharding import full_model_state_dict, retie

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if opts.lora:
        # Only DDP / one process here (refused under FSDP and DeepSpeed above): the adapters are whole.
        unwrapped = unwrapped.merge_and_unload()
        state_dict = unwrapped.state_dict()
    elif sharded:
        state_dict = full_model_state_dict(model)
    else:
        # gathers FSDP / ZeRO shards on the main process
        state_dict = retie(accelerator.get_state_dict(model), unwrapped)
    unwrapped.config.use_cache = use_cache
    if opts.gradient_checkpointing:
        _compat.disable_activation_checkpointing(unwrapped)
    unwrapped.eval()
    output = Path(opts.output_dir)
    staging = output / ".staging-final"
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Only here: save_pretrained creates its folder even when told it is not the main process, so a late rank
        # would recreate the staging folder after it was moved into place (the state dict is already gathered).
        unwrapped.save_pretrained(str(staging), state_dict=state_dict, save_function=accelerator.save)
        tokenizer.save_pretrained(str(staging))
        state.save_to_json(str(staging / STATE_FILE))
        for item in sorted(staging.iterdir()):
            os.replace(item, output / item.name)
        staging.rmdir()
    accelerator.wait_for_everyone()
    return unwrapped
