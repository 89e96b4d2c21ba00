"""Fine-tuning speed and memory on SmolLM2-135M (CPU).

    python benchmarks/bench_finetune.py throughput   # tokens/s of longctx_hf.finetune vs HF Trainer (target >= 1.0x)
    python benchmarks/bench_finetune.py memory       # peak RSS of one training step per length, +/- checkpointing
        [--lengths N ...] [--checkpointing both|yes|no] [--checkpointing-only-from N] [--factor F] [--lora]

Both sides train the same YaRN x2 model on the same packed blocks (Python's `argparse.py`, one document, so the
SDPA causal kernel is used), batch 1, AdamW, linear schedule, grad clipping 1.0, fp32. Runs alternate (ours,
Trainer, ours, Trainer) and the best run of each side counts, because the CPU is shared with other jobs.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

STDLIB = Path(json.__file__).parents[1]
THROUGHPUT_TEXT = STDLIB / "argparse.py"
MEMORY_TEXT = STDLIB / "_pydecimal.py"  # ~60k tokens: enough for one 16k block


def run_ours(length, steps, folder):
    from longctx_hf import finetune

    result = finetune("smollm2", method="yarn", factor=2, data=str(THROUGHPUT_TEXT), max_length=length, steps=steps,
                      warmup_steps=1, output_dir=str(folder), progress_bar=False)
    return result.log_history[-1]["train_runtime"]


def run_trainer(length, steps, folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from longctx_hf import extend_context
    from longctx_hf.data import packed_dataset
    from longctx_hf.real_model import smollm2_path

    path = smollm2_path()
    torch.manual_seed(0)
    dataset = packed_dataset(str(THROUGHPUT_TEXT), AutoTokenizer.from_pretrained(path), length)
    model = extend_context(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), "yarn", 2)
    model.config.use_cache = False
    args = TrainingArguments(output_dir=str(folder), max_steps=steps, per_device_train_batch_size=1,
                             learning_rate=2e-5, warmup_steps=1, lr_scheduler_type="linear", logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    metrics = Trainer(model=model, args=args, train_dataset=dataset).train().metrics
    return metrics["train_runtime"]


def throughput(length, steps, rounds):
    tokens = steps * length
    best = {"longctx_hf.finetune": float("inf"), "transformers.Trainer": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for name, runner in (("longctx_hf.finetune", run_ours), ("transformers.Trainer", run_trainer)):
                seconds = runner(length, steps, Path(tmp) / f"{name}-{round_}")
                print(f"round {round_}: {name:22s} {seconds:7.2f} s, {tokens / seconds:7.1f} tokens/s", flush=True)
                best[name] = min(best[name], seconds)
    ours, theirs = best["longctx_hf.finetune"], best["transformers.Trainer"]
    print(f"SmolLM2-135M, {length} tokens, {steps} steps, best of {rounds}: longctx_hf {tokens / ours:.1f} tokens/s, "
          f"HF Trainer {tokens / theirs:.1f} tokens/s, ratio {theirs / ours:.3f}x (target >= 1.0)")


def one_step(length, checkpointing, folder, factor, lora):
    """Child process: one training step at `length`; prints its own peak RSS and the step time."""
    from longctx_hf import finetune

    result = finetune("smollm2", method="yarn", factor=factor, data=str(MEMORY_TEXT), max_length=length, steps=1,
                      gradient_checkpointing=checkpointing, lora=lora, output_dir=str(folder), progress_bar=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak_mb, "seconds": result.log_history[-1]["train_runtime"]}))


def memory(lengths, checkpointing_only_from, factor, lora, skip_checkpointing=False):
    print(f"YaRN x{factor:g}, {'LoRA rank 16' if lora else 'full fine-tuning'}")
    print("length  checkpointing  peak RSS (MB)  step (s)")
    for length in lengths:
        for checkpointing in (False, True):
            if (not checkpointing and length >= checkpointing_only_from) or (checkpointing and skip_checkpointing):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                out = subprocess.run([sys.executable, __file__, "_one_step", str(length), str(int(checkpointing)),
                                      str(Path(tmp) / "out"), str(factor), str(int(lora))],
                                     capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{length:6d}  {checkpointing!s:13s}  failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{length:6d}  {checkpointing!s:13s}  {row['peak_mb']:13.0f}  {row['seconds']:8.1f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_one_step"]:
        one_step(int(sys.argv[2]), bool(int(sys.argv[3])), sys.argv[4], float(sys.argv[5]), bool(int(sys.argv[6])))
        sys.exit()
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["throughput", "memory"])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--checkpointing-only-from", type=int, default=16384,
                        help="lengths from here on run with gradient checkpointing only (too slow/big without)")
    parser.add_argument("--checkpointing", choices=["both", "yes", "no"], default="both",
                        help="memory: with and/or without gradient checkpointing")
    parser.add_argument("--factor", type=float, default=2.0, help="memory: YaRN factor (x2 reaches 16384 tokens)")
    parser.add_argument("--lora", action="store_true", help="memory: LoRA (rank 16) instead of full fine-tuning")
    args = parser.parse_args()
    if args.part == "throughput":
        throughput(args.length, args.steps, args.rounds)
    else:
        memory(args.lengths, 0 if args.checkpointing == "yes" else args.checkpointing_only_from, args.factor,
               args.lora, skip_checkpointing=args.checkpointing == "no")
