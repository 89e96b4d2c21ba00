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


def _split(option, text, convert=str):
    """'a,b' -> [convert('a'), convert('b')]; a bad item is a ValueError naming the option."""
    try:
        return [convert(item.strip()) for item in str(text).split(",") if item.strip()]
    except ValueError as err:
        raise ValueError(f"{option}: {err}") from None


def _eval(args) -> int:
    from .evaluate.run import evaluate_model, markdown_table, parse_length

    try:
        lengths = _split("--lengths", args.lengths, parse_length)
        passkey_lengths = _split("--passkey-lengths", args.passkey_lengths, parse_length) if args.passkey_lengths \
            else None
        options = dict(
            methods=_split("--method", args.method), factor=args.factor, lengths=lengths,
            passkey_lengths=passkey_lengths, tasks=_split("--tasks", args.tasks), text_file=args.text,
            depths=_split("--depths", args.depths, float),
            trials=args.trials, dtype=args.dtype, device_map=None if args.device_map == "none" else args.device_map,
            output=args.output, num_scored=args.score_tokens, stride=args.stride, seed=args.seed)
        results = evaluate_model(args.model, **options)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(results))
    print(f"wrote results.json, results.md and plots to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longctx-hf", description="Extend the context window of HF models.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what a checkpoint's config says about its context (reads config.json only)")
    info.add_argument("path", help="checkpoint folder or config.json")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=_info)
    listing = sub.add_parser("methods", help="list the extension methods and their options")
    listing.set_defaults(run=_methods)
    evaluate = sub.add_parser(
        "eval", help="perplexity vs length and passkey retrieval for several methods, with plots",
        description="Evaluate extension methods on MODEL (a folder, a Hub id, or 'smollm2' for the offline "
                    "SmolLM2-135M-Instruct). Writes results.json, results.md, ppl_vs_length.png and "
                    "passkey_heatmap.png into --output.")
    evaluate.add_argument("model", help="checkpoint folder, Hub repo id, or 'smollm2'")
    evaluate.add_argument("--method", default="none,yarn",
                          help="comma-separated methods to compare; 'none' = the model as loaded (default: none,yarn)")
    evaluate.add_argument("--factor", type=float, default=None,
                          help="extension factor (> 1); default: the smallest that covers the longest length")
    evaluate.add_argument("--lengths", default="2k,4k,8k,16k", help="context lengths, 2k = 2048 (default: 2k,4k,8k,16k)")
    evaluate.add_argument("--passkey-lengths", default=None, help="passkey prompt lengths (default: --lengths)")
    evaluate.add_argument("--tasks", default="ppl,passkey", help="ppl, passkey or both (default: ppl,passkey)")
    evaluate.add_argument("--text", default=None,
                          help="text file for perplexity (default: the Python standard library sources)")
    evaluate.add_argument("--depths", default="0.1,0.5,0.9", help="passkey depths in [0, 1] (default: 0.1,0.5,0.9)")
    evaluate.add_argument("--trials", type=int, default=3, help="random keys per passkey cell (default: 3)")
    evaluate.add_argument("--score-tokens", type=int, default=None,
                          help="perplexity of this many final tokens at every length (default: half the shortest)")
    evaluate.add_argument("--stride", type=int, default=None,
                          help="baseline sliding-window stride (default: a quarter of the pretrained length)")
    evaluate.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    evaluate.add_argument("--device-map", default="none",
                          help="'auto' spreads a model larger than one device (accelerate); default: none (CPU)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the passkey keys (default: 0)")
    evaluate.add_argument("--output", required=True, help="new folder for the results (never overwritten)")
    evaluate.set_defaults(run=_eval)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
