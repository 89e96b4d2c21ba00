"""RULER on SmolLM2-135M-Instruct (pretrained to 8192 tokens): the unextended model and extension methods at x2.

Every (method, length) is its own `longctx_hf.evaluate.evaluate_model` run in its own folder, lengths in the outer
loop, so a run that is cut off keeps every finished cell and a second call continues where it stopped (finished
folders are skipped, an unfinished one is started again in a new folder). The samples are the same for every
method: they depend only on the seed, the task, the length and the tokenizer.

`longrope_searched` is LongRoPE with the factors `bench_longrope_search.py` searched (--factors, default the x2
search with the needle-driven fitness, the one that retrieves best): saved once as a checkpoint beside the cells
(tokenizer included, one per factors file), evaluated as that model, and labelled `longrope_searched` in the
reports, with the factors in the run's options.

    python benchmarks/bench_ruler_smollm2.py run OUT [--methods none,yarn,self_extend,longrope_searched] [--lengths 4k,8k,16k]
        [--samples 5] [--factor 2] [--no-chat-template]
    python benchmarks/bench_ruler_smollm2.py combine OUT
        -> OUT/combined/results.json, results.md, ruler_heatmap.png (every finished cell)
"""
import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

SEARCHED = "longrope_searched"
FACTORS = Path(__file__).parent / "results" / "longrope_smollm2_x2_needle" / "factors.json"


def _folder(output, method, length):
    return Path(output) / f"{method}-{length}"


def searched_checkpoint(output, factor, factors_file):
    """SmolLM2 extended with the searched LongRoPE factors, saved (with its tokenizer) once under OUTPUT, in a folder
    named by the factors file's hash (another file gets another checkpoint). Returns (folder, options)."""
    text = Path(factors_file).read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    search = Path(factors_file).with_name("results.json")  # the search's own record says which factor it searched
    searched_factor = json.loads(search.read_text()).get("setup", {}).get("factor") if search.exists() else None
    if searched_factor is None:
        raise SystemExit(f"{search} (the search's record beside {factors_file}) is missing or names no factor")
    if searched_factor != factor:
        raise SystemExit(f"{factors_file} holds factors searched for x{searched_factor:g}, not --factor {factor:g}")
    searched = json.loads(text)
    options = {"factors_file": Path(factors_file).name, "factors_sha256": digest,
               "long_factor": searched["long_factor"], "attention_factor": searched["attention_factor"]}
    folder = Path(output) / "checkpoints" / f"{SEARCHED}-x{factor:g}-{digest}"
    if (folder / "config.json").exists():
        return folder, options
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longctx_hf import extend_context
    from longctx_hf.real_model import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    extend_context(model, "longrope", factor, long_factor=searched["long_factor"],
                   attention_factor=searched["attention_factor"])
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(staging)
    staging.rename(folder)
    return folder, options


def label_searched(folder, factor, options):
    """The searched checkpoint ran as the model itself ("none"): name it in the cell's results and reports (run
    again on a finished cell, so a run cut off between the evaluation and this step still gets it)."""
    from longctx_hf.evaluate import write_reports

    results = json.loads((folder / "results.json").read_text())
    recorded = results["runs"][0].get("options", {}).get("factors_sha256")
    if results["runs"][0]["method"] == SEARCHED and recorded != options["factors_sha256"]:
        raise SystemExit(f"{folder} holds another factors file's results (sha256 {recorded}); use another OUTPUT")
    if results["runs"][0]["method"] != SEARCHED:
        results["runs"][0].update(method=SEARCHED, factor=factor, options=options)
        write_reports(results, folder)


def run(args):
    from longctx_hf.evaluate import evaluate_model
    from longctx_hf.evaluate.run import parse_length

    lengths = [parse_length(n) for n in args.lengths.split(",")]
    methods = args.methods.split(",")
    searched = searched_checkpoint(args.output, args.factor, args.factors) if SEARCHED in methods else None
    for length in lengths:
        for method in methods:
            folder = _folder(args.output, method, length)
            done = folder / "results.json"
            model, evaluated, options = "smollm2", method, None
            if method == SEARCHED:
                (checkpoint, options), evaluated = searched, "none"
                model = str(checkpoint)
            if done.exists() and json.loads(done.read_text())["complete"]:
                if options is not None:
                    label_searched(folder, args.factor, options)
                print(f"{folder.name}: done already", flush=True)
                continue
            if folder.exists():  # cut off: keep what it wrote, start this cell again
                shutil.move(folder, folder.with_name(f"{folder.name}.cut-{int(time.time())}"))
            start = time.perf_counter()
            evaluate_model(model, [evaluated], factor=None if evaluated == "none" else args.factor,
                           lengths=[length], tasks=["ruler"], samples=args.samples, chat_template=args.chat_template,
                           seed=0, output=str(folder))
            if options is not None:
                label_searched(folder, args.factor, options)
            print(f"{folder.name}: {time.perf_counter() - start:.0f} s", flush=True)


def combine(args):
    from longctx_hf.evaluate import write_reports

    parts = sorted((json.loads((p / "results.json").read_text()) for p in Path(args.output).iterdir()
                    if p.is_dir() and "." not in p.name and p.name not in ("combined", "checkpoints")
                    and (p / "results.json").exists()),
                   key=lambda r: (r["ruler"]["lengths"][0], r["model"] != "smollm2"))  # first: a smollm2 cell
    if not parts:
        raise SystemExit(f"no runs in {args.output}")
    order = list(dict.fromkeys(["none", "yarn"] + [part["runs"][0]["method"] for part in parts]))
    runs = {}
    for part in parts:
        source = part["runs"][0]
        run = runs.setdefault(source["method"], {key: value for key, value in source.items() if key != "ruler"}
                              | {"ruler": []})
        run["ruler"] += source.get("ruler", [])
    first = parts[0]
    combined = {key: value for key, value in first.items() if key not in ("runs", "ruler_summary", "plots")}
    combined["runs"] = [runs[method] for method in order if method in runs]
    combined["ruler"] = dict(first["ruler"], lengths=sorted({n for part in parts for n in part["ruler"]["lengths"]}))
    combined["lengths"] = combined["ruler"]["lengths"]
    combined["plots"] = {}
    combined["complete"] = all(part["complete"] for part in parts)
    combined["combined_from"] = sorted(f"{part['runs'][0]['method']}-{part['ruler']['lengths'][0]}"
                                       for part in parts)
    out = Path(args.output) / "combined"
    out.mkdir(exist_ok=True)
    print(write_reports(combined, out))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    part = sub.add_parser("run")
    part.add_argument("output")
    part.add_argument("--methods", default="none,yarn,self_extend")
    part.add_argument("--lengths", default="4k,8k,16k")
    part.add_argument("--samples", type=int, default=5)
    part.add_argument("--factor", type=float, default=2.0)
    part.add_argument("--factors", default=str(FACTORS), help=f"the searched factors for {SEARCHED}")
    part.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    part.set_defaults(run=run)
    part = sub.add_parser("combine")
    part.add_argument("output")
    part.set_defaults(run=combine)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
