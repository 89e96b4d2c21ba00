"""SelfExtend on SmolLM2-135M (pretrained to 8192 tokens), zero-shot, next to YaRN, in the evaluation format.

Parts (each writes as it goes; run them one after another on a quiet machine):

    python benchmarks/bench_self_extend_smollm2.py quality OUT --factor 2 --length 16384 [--methods ...] [--trials 1]
        [--depths 0.1,0.5,0.9]
        `longctx_hf.evaluate.evaluate_model`: perplexity of the last 4096 tokens of the default text with the full
        context, next to the 8k-window baseline on the same tokens (stride 2048), and passkey at depths 0.1/0.5/0.9
        -> OUT/results.json, results.md, ppl_vs_length.png, passkey_heatmap.png
    python benchmarks/bench_self_extend_smollm2.py variant OUT --length 32768 [--method self_extend] [--group-size 8
        --window 2048] [--factor F]: the same perplexity alone (no passkey) for one method at factor F (default
        length / 8192), SelfExtend with an explicit G and W if given -> OUT/variant-<method>[-G8-W2048]-32768.json
    python benchmarks/bench_self_extend_smollm2.py hf_dynamic OUT --length 32768
        the same perplexity for transformers' own dynamic NTK (native `rope_type: dynamic`, factor length / 8192),
        which scales the whole forward by its total length (longctx_hf's cache-exact dynamic_ntk computes every
        token at its own length, one attention call per token past 8192: too slow at 32k on this CPU)
        -> OUT/hf-dynamic-ntk-32768.json
    python benchmarks/bench_self_extend_smollm2.py combine OUT RESULT_DIR [RESULT_DIR ...]
        one results.json / results.md / ppl_vs_length.png / passkey_heatmap.png from the results.json files and
        variant / hf_dynamic rows in the given folders (all on the same scored tokens), one run per method and factor
    python benchmarks/bench_self_extend_smollm2.py speed OUT --lengths 16384,32768 [--methods none,self_extend]
        one forward (hidden states, no cache) per method and length, each in its own process: seconds and peak
        memory above the loaded model, and the ratio to the plain model at the same length -> OUT/speed.json
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SCORED, STRIDE = 4096, 2048

ONE_FORWARD = r"""
import json, resource, sys, time
import torch
from transformers import AutoModelForCausalLM
from longctx_hf import extend_context
from longctx_hf.real_model import smollm2_path

method, length, factor = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(smollm2_path()).eval()
if method != "none":
    extend_context(model, method, factor=factor)
ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))

def rss_mb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024

with torch.no_grad():
    model.base_model(ids[:, :64], use_cache=False)  # warm-up
    loaded = rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:  # reset the peak (VmHWM) to the current RSS
        refs.write("5")
    start = time.perf_counter()
    model.base_model(ids, use_cache=False)
    seconds = time.perf_counter() - start
print(json.dumps({"method": method, "length": length, "factor": factor, "seconds": seconds,
                  "rss_loaded_mb": loaded, "peak_above_loaded_mb": rss_mb("VmHWM") - loaded}))
"""


def quality(args):
    from longctx_hf.evaluate import evaluate_model

    evaluate_model("smollm2", methods=args.methods.split(","), factor=args.factor, lengths=[args.length],
                   tasks=["ppl", "passkey"], depths=[float(d) for d in args.depths.split(",")], trials=args.trials,
                   num_scored=SCORED,
                   stride=STRIDE, output=args.output)


def _perplexity_row(model, length, file_name, output, **described):
    """Perplexity of the last SCORED tokens of the default text at `length` (the tokens `quality` scores).

    evaluate_model builds its default text to at least 8 characters per token of its longest length, so the text
    (and its last tokens) depends on that length; 16384 here for every length up to 16k, as in the 8k/16k runs."""
    import torch
    from transformers import AutoTokenizer

    from longctx_hf.evaluate import nll_of_last
    from longctx_hf.evaluate.perplexity import default_text, perplexity
    from longctx_hf.real_model import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    ids = tokenizer(default_text(min_chars=8 * max(length, 16384)), return_tensors="pt").input_ids[0][-length:]
    start = time.perf_counter()
    with torch.no_grad():
        ppl = perplexity(nll_of_last(model, ids, SCORED), SCORED)
    row = {**described, "length": length, "ppl": ppl, "tokens_scored": SCORED,
           "seconds": time.perf_counter() - start}
    print(row)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / file_name).write_text(json.dumps(row, indent=2))


def variant(args):
    from transformers import AutoModelForCausalLM

    from longctx_hf import extend_context
    from longctx_hf.real_model import smollm2_path

    options = {name: getattr(args, name) for name in ("group_size", "window") if getattr(args, name) is not None}
    model = AutoModelForCausalLM.from_pretrained(smollm2_path()).eval()
    if args.factor_given:
        extend_context(model, args.method, factor=args.factor, **options)
    else:
        extend_context(model, args.method, target_length=args.length, **options)
    suffix = "".join(f"-{'G' if name == 'group_size' else 'W'}{value}" for name, value in options.items())
    _perplexity_row(model, args.length, f"variant-{args.method}{suffix}-{args.length}.json", args.output,
                    method=args.method, factor=args.factor if args.factor_given else args.length / 8192, **options)


def hf_dynamic(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    from longctx_hf.real_model import smollm2_path

    config = AutoConfig.from_pretrained(smollm2_path())
    factor = args.length / config.max_position_embeddings
    config.rope_parameters = {"rope_type": "dynamic", "factor": factor,
                              "rope_theta": config.rope_parameters["rope_theta"]}
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), config=config).eval()
    _perplexity_row(model, args.length, f"hf-dynamic-ntk-{args.length}.json", args.output,
                    method="transformers dynamic NTK (whole-forward scaling)", factor=factor)


def combine(args):
    from longctx_hf.evaluate import write_reports

    runs, baseline, base = {}, {}, None
    for folder in map(Path, args.inputs):
        for path in sorted(folder.glob("*.json")):
            data = json.loads(path.read_text())
            if "runs" in data:  # an evaluate_model results.json
                base = base or data
                baseline.update({row["length"]: row for row in data.get("baseline_perplexity", [])})
                for run in data["runs"]:
                    merged = runs.setdefault((run["method"], run["factor"]), {**run, "perplexity": [],
                                                                               "passkey": []})
                    merged["perplexity"] += run.get("perplexity") or []
                    merged["passkey"] += run.get("passkey") or []
            elif "ppl" in data:  # a variant / hf_dynamic row
                method = data["method"].split(" (")[0].replace("transformers dynamic NTK", "dynamic NTK (transformers)")
                factor = data.get("factor") or data["length"] / 8192
                if data.get("group_size"):
                    method += f" G{data['group_size']} W{data['window']}"
                run = runs.setdefault((method, factor), {"method": method, "factor": factor, "options": {},
                                                         "perplexity": [], "passkey": []})
                run["perplexity"].append({key: data[key] for key in ("length", "ppl", "tokens_scored", "seconds")})
    for run in runs.values():
        for row in run["perplexity"]:
            row["baseline_ppl"] = baseline[row["length"]]["ppl"]
        run["perplexity"].sort(key=lambda row: row["length"])
    order = ["none", "self_extend", "yarn", "ntk", "dynamic NTK (transformers)", "pi"]
    ranked = sorted(runs.values(), key=lambda run: (order.index(run["method"]) if run["method"] in order
                                                   else len(order), run["method"], run["factor"] or 0))
    results = {**base, "runs": ranked, "baseline_perplexity": [baseline[n] for n in sorted(baseline)],
               "lengths": sorted(baseline), "plots": {}, "complete": True,
               "combined_from": [str(folder) for folder in args.inputs]}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    print(write_reports(results, out))


def speed(args):
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for length in [int(n) for n in args.lengths.split(",")]:
        for method in args.methods.split(","):
            factor = max(2.0, length / 8192)
            done = subprocess.run([sys.executable, "-c", ONE_FORWARD, method, str(length), str(factor)],
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                raise RuntimeError(done.stderr[-3000:])
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            plain = next((r for r in rows if r["method"] == "none" and r["length"] == length), None)
            if plain:
                rows[-1]["time_ratio_to_plain"] = rows[-1]["seconds"] / plain["seconds"]
                rows[-1]["memory_ratio_to_plain"] = rows[-1]["peak_above_loaded_mb"] / plain["peak_above_loaded_mb"]
            print(rows[-1], flush=True)
            (out / "speed.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["quality", "variant", "hf_dynamic", "combine", "speed"])
    parser.add_argument("output")
    parser.add_argument("inputs", nargs="*")
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--methods", default=None)
    parser.add_argument("--method", default="self_extend")
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--window", type=int, default=None)
    arguments = parser.parse_args()
    arguments.factor_given = "--factor" in sys.argv
    if arguments.methods is None:
        arguments.methods = "none,self_extend" if arguments.part == "speed" else "self_extend,yarn"
    started = time.perf_counter()
    {"quality": quality, "variant": variant, "hf_dynamic": hf_dynamic, "combine": combine,
     "speed": speed}[arguments.part](arguments)
    print(f"total {time.perf_counter() - started:.0f} s")
