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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longctx-hf", description="Extend the context window of HF models.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what a checkpoint's config says about its context (reads config.json only)")
    info.add_argument("path", help="checkpoint folder or config.json")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=_info)
    listing = sub.add_parser("methods", help="list the extension methods and their options")
    listing.set_defaults(run=_methods)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
