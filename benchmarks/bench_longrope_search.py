"""LongRoPE search on SmolLM2-135M (pretrained 8192 tokens), then the searched factors against YaRN on held-out text.

    python benchmarks/bench_longrope_search.py search FACTOR OUTPUT [--budget N] [--scored-tokens N] [--fitness needle]
        # calibration: stdlib packages; fitness: perplexity of the window, of its last N tokens, or needle-driven
    python benchmarks/bench_longrope_search.py evaluate FACTOR OUTPUT [--passkey yarn,longrope_searched]

`search` runs `longctx_hf.search.run_search` (resumable: run it again to continue). `evaluate` scores the last
4096 tokens of the text `longctx-hf eval` uses (never seen by the search) at L x FACTOR tokens, with the full
context, for YaRN and the searched factors, against the unextended model with an 8k sliding window on the same
tokens; and the same inside 8k (an 8192-token window), where the extension should cost nothing. `--passkey NAMES`
adds passkey retrieval at L x FACTOR for those variants, depths 0.1 / 0.5 / 0.9, 3 keys each (a 16k prompt is one to
two minutes here, so 9 per variant). `--variants` picks which run (also `dynamic_longrope_searched`: the searched
factors past L only, on the cache-exact runtime). Writes
OUTPUT/evaluation-xF-VARIANTS.json.
"""
import argparse
import json
import time
from pathlib import Path

SCORED = 4096


def evaluate(factor, output, passkey, names=("yarn", "longrope_searched")):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longctx_hf import extend_context
    from longctx_hf.evaluate import nll_of_last, passkey_grid
    from longctx_hf.evaluate.perplexity import default_text, default_text_name, perplexity, sliding_window_nll
    from longctx_hf.real_model import smollm2_path

    folder = Path(output) / f"search-x{factor:g}"
    searched = json.loads((folder / "factors.json").read_text())
    pretrained = 8192
    length = int(pretrained * factor)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    ids = tokenizer(default_text(min_chars=8 * length), return_tensors="pt").input_ids[0][-length:]
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    rows = {"text": default_text_name(), "length": length, "scored": SCORED,
            "calibration_text": json.loads((folder / "results.json").read_text())["setup"]["calibration_text"]}
    started = time.perf_counter()
    rows["baseline_8k_window"] = perplexity(sliding_window_nll(model, ids, SCORED, pretrained, SCORED), SCORED)
    rows["none_inside_8k"] = perplexity(nll_of_last(model, ids[-pretrained:], SCORED), SCORED)
    found = dict(long_factor=searched["long_factor"], attention_factor=searched["attention_factor"])
    # name: (method, options); dynamic_longrope: the searched factors past L only, the pretrained RoPE up to it
    variants = {"yarn": ("yarn", {}), "longrope_searched": ("longrope", found),
                "dynamic_longrope_searched": ("dynamic_longrope", found)}
    variants = {name: variant for name, variant in variants.items() if name in names}
    for name, (method, options) in variants.items():
        extend_context(model, method, factor, **options)
        rows[name] = perplexity(nll_of_last(model, ids, SCORED), SCORED)
        rows[name + "_inside_8k"] = perplexity(nll_of_last(model, ids[-pretrained:], SCORED), SCORED)
        if name in passkey:
            grid = passkey_grid(model, tokenizer, [length], [0.1, 0.5, 0.9], trials=3, seed=0)
            rows[name + "_passkey"] = sum(cell["correct"] for cell in grid), sum(cell["trials"] for cell in grid)
        print(name, {k: v for k, v in rows.items() if k.startswith(name)}, flush=True)
    for name in variants:
        rows[name + "_ratio"] = rows[name] / rows["baseline_8k_window"]
        rows[name + "_inside_8k_ratio"] = rows[name + "_inside_8k"] / rows["none_inside_8k"]
    rows["seconds"] = time.perf_counter() - started
    (Path(output) / f"evaluation-x{factor:g}-{'-'.join(variants)}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["search", "evaluate"])
    parser.add_argument("factor", type=float)
    parser.add_argument("output")
    parser.add_argument("--budget", type=int, default=24)
    parser.add_argument("--scored-tokens", type=int, default=None, help="search: fitness on the last N tokens only")
    parser.add_argument("--fitness", default="perplexity", choices=["perplexity", "needle"],
                        help="search: the window's perplexity, or LongRoPE2's needle-driven perplexity")
    parser.add_argument("--passkey", default="", help="comma-separated variants to run passkey for")
    parser.add_argument("--variants", default="yarn,longrope_searched",
                        help="which variants to evaluate: yarn, longrope_searched, dynamic_longrope_searched")
    args = parser.parse_args()
    if args.part == "search":
        from longctx_hf.search import run_search

        result = run_search("smollm2", factor=args.factor, output_dir=Path(args.output) / f"search-x{args.factor:g}",
                            budget=args.budget, scored_tokens=args.scored_tokens, fitness=args.fitness)
        print(json.dumps({k: result.results[k] for k in ("best", "yarn_ppl", "evaluations", "seconds")}, indent=1))
    else:
        evaluate(args.factor, args.output, [name for name in args.passkey.split(",") if name],
                 args.variants.split(","))


if __name__ == "__main__":
    main()
