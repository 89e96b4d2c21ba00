"""`longctx-hf` command line: thin; parse, call the API, print."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


def _info(args) -> int:
    from .hf_config import describe

    path = Path(args.path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        print(f"error: no config.json at {path}", file=sys.stderr)
        return 2
    info = describe(json.loads(config_file.read_text()))
    if args.json:
        print(json.dumps(asdict(info), indent=2))
        return 0
    print(f"method:              {info.method}")
    print(f"factor:              {info.factor:g}")
    print(f"pretrained length:   {info.pretrained_length}")
    print(f"extended length:     {info.extended_length}")
    print(f"attention scaling:   {info.attention_scaling:.6g}")
    print(f"rope_theta:          {info.rope_theta}")
    if info.options:
        print(f"options:             {info.options}")
    print("loads with:          " + ("plain transformers" if info.loads_with_plain_transformers
                                      else "trust_remote_code=True"))
    for warning in info.warnings:
        print(f"warning: {warning}")
    return 0


def _methods(args) -> int:
    from .methods import METHODS

    for name, module in METHODS.items():
        aliases = f" (alias: {', '.join(module.ALIASES)})" if module.ALIASES else ""
        options = ", ".join(module.Spec.option_names()) or "-"
        print(f"{name}{aliases}\n    {module.__doc__.strip().splitlines()[0]}\n    options: {options}")
    return 0


def _finetune(args) -> int:
    from .train import check_options, run

    try:  # bad options are refused before any weights or data are loaded
        options = check_options(
        args.model, method=args.method, factor=args.factor, target_length=args.target_length, data=args.data,
        max_length=args.max_length, steps=args.steps, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, lr_scheduler=args.lr_scheduler, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lora=args.lora, lora_rank=args.lora_rank,
        lora_train_embeddings_and_norms=args.lora_train_embeddings_and_norms,
        gradient_checkpointing=args.gradient_checkpointing, attn_implementation=args.attn_implementation,
        separate_documents=not args.no_separate_documents, mixed_precision=args.mixed_precision,
        logging_steps=args.logging_steps, save_steps=args.save_steps, resume_from=args.resume_from, seed=args.seed,
        text_column=args.text_column, output_dir=args.output,
        )
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = run(options)
    final = result.log_history[-1]
    if result.is_main_process:
        print(f"saved {result.output_dir} after {final['step']} steps, train loss {final['train_loss']:.4f}, "
              f"{final['train_tokens_per_second']:.0f} tokens/s")
    return 0


def _add_finetune_parser(sub):
    ft = sub.add_parser("finetune", help="extend a model's context, then fine-tune it (accelerate; LoRA optional)")
    ft.add_argument("model", help="checkpoint folder, Hub id, or 'smollm2'")
    ft.add_argument("--method", required=True, help="pi, ntk, dynamic_ntk or yarn")
    size = ft.add_mutually_exclusive_group(required=True)
    size.add_argument("--factor", type=float, help="extension factor relative to the pretrained context")
    size.add_argument("--target-length", type=int, help="extended context in tokens")
    ft.add_argument("--data", required=True, help="text file, folder of text files, or Hub dataset (needs datasets)")
    ft.add_argument("--text-column", default="text", help="column of a Hub dataset (default: text)")
    ft.add_argument("--max-length", type=int, required=True, help="tokens per packed training block")
    ft.add_argument("--steps", type=int, required=True, help="optimizer steps")
    ft.add_argument("--learning-rate", type=float, default=2e-5)
    ft.add_argument("--warmup-steps", type=int, default=None, help="default: min(20, steps // 10)")
    ft.add_argument("--lr-scheduler", default="linear", help="linear (decay to 0), constant or cosine, after warmup")
    ft.add_argument("--batch-size", type=int, default=1, help="blocks per micro-batch per process")
    ft.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ft.add_argument("--lora", action="store_true", help="train LoRA adapters (peft), merged into the saved weights")
    ft.add_argument("--lora-rank", type=int, default=16)
    ft.add_argument("--lora-train-embeddings-and-norms", action="store_true",
                    help="also train embeddings and norms (LongLoRA)")
    ft.add_argument("--gradient-checkpointing", action="store_true")
    ft.add_argument("--attn-implementation", default=None, help="sdpa, eager or flash_attention_2 (needs flash-attn)")
    ft.add_argument("--no-separate-documents", action="store_true",
                    help="plain concatenation: documents in a block attend to each other (keeps SDPA's causal kernel)")
    ft.add_argument("--mixed-precision", default=None, help="no, bf16 or fp16 (default: from accelerate launch)")
    ft.add_argument("--logging-steps", type=int, default=1)
    ft.add_argument("--save-steps", type=int, default=None, help="write OUTPUT/checkpoint-N every N steps")
    ft.add_argument("--resume-from", default=None, help="a checkpoint-N folder to continue from")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--output", required=True, help="new (or empty) folder for the checkpoint")
    ft.set_defaults(run=_finetune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longctx-hf", description="Extend the context window of HF models.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what a checkpoint's config says about its context (reads config.json only)")
    info.add_argument("path", help="checkpoint folder or config.json")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=_info)
    listing = sub.add_parser("methods", help="list the extension methods and their options")
    listing.set_defaults(run=_methods)
    _add_finetune_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
