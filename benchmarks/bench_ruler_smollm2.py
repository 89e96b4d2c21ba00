"""RULER on SmolLM2-135M-Instruct (pretrained to 8192 tokens): the unextended model and extension methods at x2.

Every (method, length, task) is its own `longctx_hf.evaluate.evaluate_model` run in its own folder
(`METHOD-LENGTH-TASK`), lengths in the outer loop, so a run that is cut off loses at most one task's samples and a
second call continues where it stopped (finished folders are skipped, an unfinished one is started again in a new
folder). A folder `METHOD-LENGTH` holding every task (an earlier layout) counts as finished for all of them. The
samples are the same for every method and however the tasks are split: each depends only on the seed, the task,
the length, its index and the tokenizer.

`longrope_searched` is LongRoPE with the factors `bench_longrope_search.py` searched (--factors, default the x2
search with the needle-driven fitness, the one that retrieves best): saved once as a checkpoint (tokenizer
included, one per factors file, under --checkpoints, default OUT/checkpoints), evaluated as that model, and
labelled `longrope_searched` in the reports, with the factors in the run's options.

    python benchmarks/bench_ruler_smollm2.py run OUT [--methods none,yarn,self_extend,longrope_searched] [--lengths 4k,8k,16k]
        [--samples 5] [--factor 2] [--checkpoints DIR] [--no-chat-template]
    python benchmarks/bench_ruler_smollm2.py combine OUT
        -> OUT/results.json, results.md, ruler_heatmap.png (every finished cell; RESULTS.md shows the heat-map)
"""
import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

SEARCHED = "longrope_searched"
FACTORS = Path(__file__).parent / "results" / "longrope_smollm2_x2_needle" / "factors.json"


def _finished(folder) -> bool:
    done = folder / "results.json"
    return done.exists() and json.loads(done.read_text())["complete"]


def searched_checkpoint(checkpoints, factor, factors_file):
    """SmolLM2 extended with the searched LongRoPE factors, saved (with its tokenizer) once under CHECKPOINTS, in a folder
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
    folder = Path(checkpoints) / f"{SEARCHED}-x{factor:g}-{digest}"
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
    from longctx_hf.evaluate.ruler_tasks import TASKS
    from longctx_hf.evaluate.run import parse_length

    lengths = [parse_length(n) for n in args.lengths.split(",")]
    methods = args.methods.split(",")
    checkpoints = args.checkpoints or Path(args.output) / "checkpoints"
    searched = searched_checkpoint(checkpoints, args.factor, args.factors) if SEARCHED in methods else None
    for length in lengths:
        for method in methods:
            model, evaluated, options = "smollm2", method, None
            if method == SEARCHED:
                (checkpoint, options), evaluated = searched, "none"
                model = str(checkpoint)
            whole = Path(args.output) / f"{method}-{length}"
            for task in TASKS:
                folder = whole if whole.exists() else Path(args.output) / f"{method}-{length}-{task}"
                if _finished(folder):
                    if options is not None:
                        label_searched(folder, args.factor, options)
                    print(f"{folder.name}: done already", flush=True)
                    if folder == whole:
                        break
                    continue
                if folder == whole:
                    raise SystemExit(f"{whole} is an unfinished run of every task; move it away to run by task")
                if folder.exists():  # cut off: keep what it wrote, start this cell again
                    shutil.move(folder, folder.with_name(f"{folder.name}.cut-{int(time.time())}"))
                start = time.perf_counter()
                evaluate_model(model, [evaluated], factor=None if evaluated == "none" else args.factor,
                               lengths=[length], tasks=["ruler"], ruler_tasks=[task], samples=args.samples,
                               chat_template=args.chat_template, seed=0, output=str(folder))
                if options is not None:
                    label_searched(folder, args.factor, options)
                print(f"{folder.name}: {time.perf_counter() - start:.0f} s", flush=True)


SAME_SETUP = ("samples", "chat_template", "haystack_sha256", "words", "answer_margin")


def combine(args):
    from longctx_hf.evaluate import write_reports
    from longctx_hf.evaluate.ruler_tasks import TASKS

    parts = sorted((json.loads((p / "results.json").read_text()) for p in Path(args.output).iterdir()
                    if p.is_dir() and "." not in p.name and p.name not in ("combined", "checkpoints")
                    and (p / "results.json").exists()),
                   key=lambda r: (r["ruler"]["lengths"][0], r["model"] != "smollm2"))  # first: a smollm2 cell
    if not parts:
        raise SystemExit(f"no runs in {args.output}")
    first = parts[0]
    for part in parts:  # only runs of the same samples may share a table
        differs = [key for key in SAME_SETUP if part["ruler"].get(key) != first["ruler"].get(key)]
        if differs or part["seed"] != first["seed"]:
            raise SystemExit(f"{part['runs'][0]['method']} at {part['ruler']['lengths']}: another "
                             f"{', '.join(differs) or 'seed'} than the other runs; combine only runs of one setup")
    order = list(dict.fromkeys(["none", "yarn"] + [part["runs"][0]["method"] for part in parts]))
    runs, seen = {}, set()
    for part in parts:
        source = part["runs"][0]
        run = runs.setdefault(source["method"], {key: value for key, value in source.items() if key != "ruler"}
                              | {"ruler": []})
        for cell in source.get("ruler", []):
            key = (source["method"], cell["length"], cell["task"])
            if key in seen:
                raise SystemExit(f"{key} was run twice in {args.output}; keep one")
            seen.add(key)
            run["ruler"].append(cell)
    for run in runs.values():  # task order as RULER lists them, lengths ascending
        run["ruler"].sort(key=lambda cell: (cell["length"], list(TASKS).index(cell["task"])))
    tasks = {cell["task"] for run in runs.values() for cell in run["ruler"]}
    # Only RULER ran: the perplexity and passkey settings evaluate_model records for every run do not apply.
    unused = ("runs", "ruler_summary", "plots", "passkey_lengths", "depths", "trials", "tokens_scored",
              "baseline_stride")
    combined = {key: value for key, value in first.items() if key not in unused}
    combined["runs"] = [runs[method] for method in order if method in runs]
    combined["ruler"] = dict(first["ruler"], lengths=sorted({n for part in parts for n in part["ruler"]["lengths"]}),
                             tasks=[task for task in TASKS if task in tasks])
    combined["lengths"] = combined["ruler"]["lengths"]
    combined["plots"] = {}
    combined["complete"] = all(part["complete"] for part in parts)
    combined["combined_from"] = sorted({f"{part['runs'][0]['method']}-{part['ruler']['lengths'][0]}"
                                        for part in parts})
    print(write_reports(combined, Path(args.output)))


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
    part.add_argument("--checkpoints", help=f"where {SEARCHED}'s checkpoint is saved (default OUTPUT/checkpoints)")
    part.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    part.set_defaults(run=run)
    part = sub.add_parser("combine")
    part.add_argument("output")
    part.set_defaults(run=combine)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
