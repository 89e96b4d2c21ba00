"""`longctx-hf` command line: thin; parse, call the API, print."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


def _user_errors():
    """Errors a user can cause (bad input, files, the network), printed as one line instead of a traceback.

    Evaluated only when an exception is being matched, so the success path never imports huggingface_hub.
    """
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    return ValueError, TypeError, OSError, ImportError, HfHubHTTPError, LocalEntryNotFoundError


def _info(args) -> int:
    from .hf_config import describe
    from .repo_id import looks_like_repo_id

    path = Path(args.path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file() and looks_like_repo_id(args.path):
        from .hub import config_file as hub_config_file

        try:
            config_file = hub_config_file(args.path)
        except _user_errors() as err:
            print(f"error: cannot fetch config.json of {args.path}: {err}", file=sys.stderr)
            return 2
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
    if info.pretrained_rope_theta not in (None, info.rope_theta):
        print(f"pretrained rope_theta: {info.pretrained_rope_theta}")
    if info.options:
        print(f"options:             {info.options}")
    print("loads with:          " + ("plain transformers" if info.loads_with_plain_transformers
                                      else "trust_remote_code=True"))
    if info.engines:
        print("engines:             " + "; ".join(f"{engine}: {verdict}" for engine, verdict in info.engines.items())
              + " (measured: same / refuses / different)")
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


def _option_value(text: str):
    """A method option from the command line: a JSON number/bool/null when it parses as one, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _factors_file(path, options) -> dict:
    """--factors FILE.json: a list (one factor per rotary frequency) or {"long_factor": [...], ...} (longrope)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--factors {path}: cannot read a JSON file ({err})") from None
    factors = {"long_factor": data} if isinstance(data, list) else data
    if not isinstance(factors, dict) or not set(factors) <= {"long_factor", "short_factor", "attention_factor"}:
        raise ValueError(f"--factors {path} must hold a list of numbers or an object with long_factor (and "
                         "optionally short_factor, attention_factor)")
    given_twice = sorted(set(factors) & set(options))
    if given_twice:
        raise ValueError(f"--factors {path} and --{given_twice[0].replace('_', '-')} both give {given_twice[0]}")
    return factors


def _extend(args) -> int:
    import warnings

    from .checkpoint import extend_checkpoint
    from .engines import EngineWarning
    from .hf_config import describe

    options = {name.removeprefix("option_"): value for name, value in vars(args).items()
               if name.startswith("option_") and value is not None}
    if args.factors:
        try:
            options.update(_factors_file(args.factors, options))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.private and not args.push_to_hub:
        print("error: --private applies to the Hub repo of --push-to-hub; give --push-to-hub REPO_ID or drop "
              "--private", file=sys.stderr)
        return 2
    try:
        if args.push_to_hub:  # before writing the output, not after
            from .repo_id import check_repo_id

            check_repo_id(args.push_to_hub)
        with warnings.catch_warnings():  # printed below with the config's other warnings
            warnings.simplefilter("ignore", EngineWarning)
            dst = extend_checkpoint(args.src, args.output, args.method, args.factor, target_length=args.target_length,
                                    original_max_position_embeddings=args.original, overwrite=args.overwrite,
                                    in_place=args.in_place, eval_results=args.eval_results, link=not args.copy,
                                    revision=args.revision, card_name=args.push_to_hub, **options)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = describe(json.loads((dst / "config.json").read_text()))
    print(f"wrote {dst}: {info.method} x{info.factor:g}, {info.pretrained_length} -> {info.extended_length} tokens")
    for warning in info.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.push_to_hub:
        return _push(argparse.Namespace(path=str(dst), repo_id=args.push_to_hub, private=args.private,
                                        commit_message=None))
    return 0


def _push(args) -> int:
    from .hub import push_to_hub

    try:
        commit = push_to_hub(args.path, args.repo_id, private=args.private or None,  # None: keep an existing repo's
                             commit_message=args.commit_message)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"pushed {args.path} to {args.repo_id}: {commit.commit_url}")
    return 0
def _finetune(args) -> int:
    from .train import check_options, run

    try:  # bad options are refused before any weights or data are loaded
        options = check_options(
        args.model, method=args.method, factor=args.factor, target_length=args.target_length, data=args.data,
        max_length=args.max_length, steps=args.steps, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, lr_scheduler=args.lr_scheduler, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, batch_size=args.batch_size,
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
              f"{final['train_tokens_per_second']:.0f} tokens/s (processes: {result.distributed})")
    return 0


def _add_finetune_parser(sub):
    ft = sub.add_parser("finetune", help="extend a model's context, then fine-tune it (accelerate; LoRA optional)")
    ft.add_argument("model", help="checkpoint folder, Hub id, or 'smollm2'")
    ft.add_argument("--method", required=True, help="pi, ntk, dynamic_ntk, yarn, dynamic_yarn, longrope or dynamic_longrope")
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
    ft.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    ft.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
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
            output=args.output, num_scored=args.score_tokens, stride=args.stride, seed=args.seed,
            ruler_tasks=_split("--ruler-tasks", args.ruler_tasks) if args.ruler_tasks else None,
            ruler_lengths=_split("--ruler-lengths", args.ruler_lengths, parse_length) if args.ruler_lengths else None,
            samples=args.samples, chat_template=args.chat_template, batch_size=args.batch_size,
            haystack_file=args.haystack)
        results = evaluate_model(args.model, **options)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(results))
    print(f"wrote results.json, results.md and plots to {args.output}")
    return 0


def _search(args) -> int:
    from .search import run_search

    try:
        result = run_search(args.model, factor=args.factor, output_dir=args.output, text_file=args.text,
                            budget=args.budget, minutes=args.minutes, seed=args.seed, population=args.population,
                            documents=args.documents, scored_tokens=args.scored_tokens, fitness=args.fitness,
                            checkpoint=args.checkpoint)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    best = result.best
    print(f"best of {result.evaluations} candidates: perplexity {best['ppl']:.4f} at "
          f"{result.results['setup']['target_length']} tokens (YaRN {result.results['yarn_ppl']:.4f}); wrote "
          f"{result.output_dir}")
    return 0


def _gguf(args) -> int:
    from .llama_cpp import complete_gguf, longrope_settings

    try:
        out = complete_gguf(args.checkpoint, args.converted, args.output, overwrite=args.overwrite)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = longrope_settings(args.checkpoint)
    print(f"wrote {out}: rope_factors_long / rope_factors_short ({len(settings['factors'])} factors), attn_factor "
          f"{settings['attention_factor']:.6f}, context {settings['pretrained_length']} -> "
          f"{settings['extended_length']}")
    return 0


def _add_gguf_parser(sub):
    gguf = sub.add_parser("gguf", help="add a longrope checkpoint's factors to the GGUF llama.cpp's converter wrote",
                          description="llama.cpp serves LongRoPE natively, but convert_hf_to_gguf.py writes the "
                                      "factors for Phi-3 only. This copies the converted GGUF and adds them, with "
                                      "the attention factor and the pretrained length, from the checkpoint.")
    gguf.add_argument("checkpoint", help="the longrope checkpoint folder that was converted")
    gguf.add_argument("converted", help="the GGUF convert_hf_to_gguf.py wrote from it")
    gguf.add_argument("--output", required=True, help="the completed GGUF (a new file)")
    gguf.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    gguf.set_defaults(run=_gguf)


def _add_search_parser(sub):
    search = sub.add_parser("search", help="search LongRoPE per-frequency factors on the model itself",
                            description="Evolutionary search of longrope factors (one per rotary frequency, plus "
                                        "the attention temperature), seeded with YaRN, PI and NTK; fitness is the "
                                        "perplexity at the target length on a calibration text. Resumable: run "
                                        "the same command again to continue a cut-off search.")
    search.add_argument("model", help="checkpoint folder, Hub repo id, or 'smollm2'")
    search.add_argument("--factor", type=float, required=True, help="extension factor relative to the pretrained length")
    search.add_argument("--output", required=True, help="folder for results.json, factors.json, search.png")
    search.add_argument("--text", default=None, help="calibration text file (default: the standard library's "
                                                     "package sources, not the text `eval` uses)")
    search.add_argument("--budget", type=int, default=None, help="number of candidates to evaluate")
    search.add_argument("--minutes", type=float, default=None, help="wall-clock limit")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--population", type=int, default=8, help="candidates per generation (default: 8)")
    search.add_argument("--documents", type=int, default=1,
                        help="calibration windows of the target length per evaluation (default: 1)")
    search.add_argument("--fitness", choices=["perplexity", "needle"], default="perplexity",
                        help="perplexity of calibration windows (default), or needle: LongRoPE2's needle-driven "
                             "perplexity (answers to numbers hidden across each window)")
    search.add_argument("--scored-tokens", type=int, default=None,
                        help="fitness: perplexity of only the last N tokens of each window (default: all of it), "
                             "e.g. the tokens past the pretrained length")
    search.add_argument("--checkpoint", action="store_true",
                        help="also write OUTPUT/checkpoint: the model extended with the best factors")
    search.set_defaults(run=_search)


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS

    parser = argparse.ArgumentParser(prog="longctx-hf", description="Extend the context window of HF models.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what a checkpoint's config says about its context (reads config.json only)")
    info.add_argument("path", help="checkpoint folder, config.json, or Hub repo id (fetches only config.json)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=_info)
    extend = sub.add_parser("extend", help="extend a checkpoint on disk without loading it (config + links)")
    extend.add_argument("src", help="checkpoint folder or Hub repo id")
    extend.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)} (see `longctx-hf methods`)")
    size = extend.add_mutually_exclusive_group()  # alibi takes neither (--max-length); the method decides
    size.add_argument("--factor", type=float, help="extension factor relative to the pretrained length")
    size.add_argument("--target-length", type=int, help="target context length in tokens")
    extend.add_argument("--revision", help="branch, tag or commit of a Hub SRC (default: its main branch)")
    extend.add_argument("--original", type=int, help="pretrained length, when the config does not say it")
    extend.add_argument("--output", help="output folder (required unless --in-place)")
    extend.add_argument("--in-place", action="store_true", help="rewrite SRC itself (config.json and README.md)")
    extend.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    extend.add_argument("--copy", action="store_true", help="copy weight files instead of hard-linking them")
    extend.add_argument("--eval-results", help="results.json from the evaluation, for the model card")
    extend.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload the output folder to this repo")
    extend.add_argument("--private", action="store_true", help="create the Hub repo private")
    extend.add_argument("--factors", metavar="FILE.json", help="longrope: per-frequency factors (a JSON list, or "
                                                                "an object with long_factor, short_factor)")
    for option in sorted({name for module in METHODS.values() for name in module.Spec.option_names()}):
        extend.add_argument("--" + option.replace("_", "-"), dest="option_" + option, type=_option_value,
                            help="method option (see `longctx-hf methods`)")
    extend.set_defaults(run=_extend)
    push = sub.add_parser("push", help="upload a checkpoint folder to the Hugging Face Hub")
    push.add_argument("path", help="checkpoint folder")
    push.add_argument("repo_id", help="owner/name")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--commit-message", help="commit message")
    push.set_defaults(run=_push)
    listing = sub.add_parser("methods", help="list the extension methods and their options")
    listing.set_defaults(run=_methods)
    _add_finetune_parser(sub)
    _add_search_parser(sub)
    _add_gguf_parser(sub)
    from .evaluate.ruler_tasks import TASKS as RULER_TASKS

    evaluate = sub.add_parser(
        "eval", help="perplexity vs length, passkey retrieval and RULER tasks for several methods, with plots",
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
    evaluate.add_argument("--tasks", default="ppl,passkey",
                          help="any of ppl, passkey, ruler, comma-separated (default: ppl,passkey)")
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
    evaluate.add_argument("--ruler-tasks", default=None,
                          help="RULER tasks, comma-separated (default: all): " + ", ".join(RULER_TASKS))
    evaluate.add_argument("--ruler-lengths", default=None, help="RULER sample lengths (default: --lengths)")
    evaluate.add_argument("--samples", type=int, default=5, help="RULER samples per task and length (default: 5)")
    evaluate.add_argument("--chat-template", action="store_true",
                          help="ask RULER's questions as a user turn of the model's chat template")
    evaluate.add_argument("--batch-size", type=int, default=1,
                          help="RULER prompts of equal token length generated together (default: 1)")
    evaluate.add_argument("--haystack", default=None,
                          help="text file for RULER's real-text haystack (default: the Python Language Reference)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the passkey keys and RULER samples (default: 0)")
    evaluate.add_argument("--output", required=True, help="new folder for the results (never overwritten)")
    evaluate.set_defaults(run=_eval)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
