"""Every method x engine: does the engine load the checkpoint, which length does it derive, and do its prompt
log-probabilities equal transformers' on a long text?

Checkpoints are written by `longctx-hf extend` from the real SmolLM2-135M (pretrained to 8192 tokens). Each
engine runs in its own venv and its own process (run_transformers.py, run_vllm.py, run_llama_cpp.py); the
reference is plain transformers in fp32, in a process that never imports longctx_hf. Cases run one at a time.

    python benchmarks/engines/engine_matrix.py WORKDIR --vllm-python V/bin/python --llama-python W/bin/python \
        --converter SDIST/vendor/llama.cpp/convert_hf_to_gguf.py [--only CASE,...] [--engines llama.cpp,...]

Writes WORKDIR/<case>/<engine>.json as it goes (a rerun skips what exists), then
benchmarks/results/engine_matrix.json and .md. Runs measured in WORKDIR replace the committed ones; the committed
runs not measured there are kept, so one case or one engine can be re-measured alone (`--only`, `--engines`; the
transformers reference always runs). Setup of the two engine venvs: docs/engines.md.
"""
import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
TOKENS = 12000  # past the pretrained 8192, inside every x2 extension
SHORT_TOKENS = 8000  # inside the pretrained length
PRETRAINED = 8192
# Mean |delta log-prob| per token at or below which an engine computes the same model as transformers (fp32).
# Measured noise: vLLM ~1e-5; llama.cpp ~1e-3 with its default f16 KV cache (2e-5 with an f32 one, checked on
# 2000 tokens of yarn x2). A checkpoint an engine reads differently measured 0.09 and more (the smallest: a
# dropped longrope temperature, docs/engines.md).
SAME = 1e-2

# The factors and temperature the needle-driven search found for SmolLM2 x2 (what `search` writes to factors.json)
SEARCHED = json.loads((RESULTS / "longrope_smollm2_x2_needle" / "factors.json").read_text())

# name: (method, factor, options); "none" is the unextended model, the reference for "runs the unextended model"
CASES = {
    "none": ("none", 1, {}),
    "pi-x2": ("pi", 2, {}),
    "ntk-x2": ("ntk", 2, {}),
    "yarn-x2": ("yarn", 2, {}),
    "yarn-x4": ("yarn", 4, {}),
    "yarn-x4-options": ("yarn", 4, {"beta_fast": 16.0, "attention_factor": 1.0}),
    "longrope-x2": ("longrope", 2, {}),
    "longrope-x2-searched": ("longrope", 2, SEARCHED),
    "dynamic_ntk-x2": ("dynamic_ntk", 2, {}),
    "dynamic_yarn-x2": ("dynamic_yarn", 2, {}),
    "dynamic_longrope-x2": ("dynamic_longrope", 2, SEARCHED),
    "self_extend-x2": ("self_extend", 2, {}),
}

def runs_for(case, method, options):
    """(run name, runner, extra arguments, tokens) of every engine run a case gets."""
    if method == "none":
        return [("transformers", "transformers", [], TOKENS)]
    runs = [("vllm", "vllm", [], TOKENS)]
    if method not in ("dynamic_yarn", "dynamic_longrope"):  # no engine runs them: nothing to compare against
        runs.insert(0, ("transformers", "transformers", [], TOKENS))
    if method in ("dynamic_ntk", "dynamic_yarn", "dynamic_longrope", "self_extend"):
        runs.append(("vllm-transformers-backend", "vllm", ["--model-impl", "transformers"], TOKENS))
    if method == "dynamic_ntk":  # vLLM limited to the pretrained length, against transformers at that length
        runs += [("transformers-8k", "transformers", [], SHORT_TOKENS),
                 ("vllm-max-model-len-8192", "vllm", ["--max-model-len", str(PRETRAINED)], SHORT_TOKENS)]
    runs.append(("llama.cpp", "llama.cpp", [], TOKENS))
    if method == "longrope":  # the converted GGUF completed by `longctx-hf gguf`, as the warning recommends
        runs.append(("llama.cpp-completed-gguf", "llama.cpp", ["--complete-with", sys.executable], TOKENS))
    if method == "yarn" and options:  # llama.cpp's run-time options set as docs/engines.md recommends
        runs.append(("llama.cpp-runtime-options", "llama.cpp", llama_cpp_yarn_options(options, case), TOKENS))
    return runs


def llama_cpp_yarn_options(options, case):
    """The llama.cpp settings longctx_hf's warning recommends for a yarn config's options, as runner arguments."""
    from longctx_hf.engines import llama_cpp_yarn_settings

    args = []
    for key, value in llama_cpp_yarn_settings(CASES[case][1], options).items():
        if key == "kv_overrides":
            args += [item for name, number in value.items() for item in ("--kv-override", f"{name}={number!r}")]
        else:
            args += ["--" + key.replace("_", "-"), repr(value)]
    return args


def make_tokens(workdir: Path) -> dict:
    from transformers import AutoTokenizer

    from longctx_hf.evaluate.perplexity import default_text, default_text_name
    from longctx_hf.real_model import smollm2_path

    ids = AutoTokenizer.from_pretrained(smollm2_path())(default_text(min_chars=8 * TOKENS)).input_ids[-TOKENS:]
    files = {}
    for count in (TOKENS, SHORT_TOKENS):
        files[count] = workdir / f"tokens{count}.json"
        files[count].write_text(json.dumps(ids[:count]))
    (workdir / "text.txt").write_text(default_text_name())
    return files


def make_checkpoint(workdir: Path, case: str) -> Path:
    from longctx_hf.checkpoint import extend_checkpoint
    from longctx_hf.real_model import smollm2_path

    if case == "none":
        return Path(smollm2_path())
    out = workdir / case / "checkpoint"
    if not (out / "config.json").is_file():
        method, factor, options = CASES[case]
        extend_checkpoint(smollm2_path(), out, method, factor, **options)
    return out


def run_engine(args, runner, checkpoint, tokens, out, extra):
    python = {"transformers": sys.executable, "vllm": args.vllm_python, "llama.cpp": args.llama_python}[runner]
    script = {"transformers": "run_transformers.py", "vllm": "run_vllm.py", "llama.cpp": "run_llama_cpp.py"}[runner]
    command = [python, str(HERE / script), str(checkpoint), str(tokens), str(out), *extra]
    if runner == "llama.cpp":
        command += ["--converter", args.converter]
    done = subprocess.run(command, capture_output=True, text=True)
    if not out.is_file():  # the runner itself died (e.g. killed for memory): that is a result too
        lines = (done.stderr or "").strip().splitlines()
        out.write_text(json.dumps({"loaded": False, "error": f"runner exited {done.returncode}: "
                                   + (lines[-1] if lines else "")}))
    (out.with_suffix(".log")).write_text(done.stderr[-20000:])


def mean_abs_delta(got, want):
    return sum(abs(a - b) for a, b in zip(got, want)) / len(got)


def compare(reference: dict | None, run: dict, unextended: dict | None) -> dict:
    """Mean |delta log-prob| over all tokens and past the pretrained length; perplexity of the last 4096; and
    whether the engine ran the unextended model instead."""
    row = {key: run.get(key) for key in ("loaded", "max_length", "derived_max_length", "error")
           if run.get(key) is not None}
    got, want = run.get("logprobs"), (reference or {}).get("logprobs")
    if got:
        row["ppl_last_4096"] = math.exp(-sum(got[-4096:]) / len(got[-4096:]))
        if unextended and len(unextended["logprobs"]) == len(got):
            row["mean_abs_delta_to_unextended"] = mean_abs_delta(got, unextended["logprobs"])
    if got and want and len(got) == len(want):
        deltas = [abs(a - b) for a, b in zip(got, want)]
        row["mean_abs_delta"] = sum(deltas) / len(deltas)
        past = deltas[PRETRAINED - 1:]
        if past:
            row["mean_abs_delta_past_8192"] = sum(past) / len(past)
        row["reference_ppl_last_4096"] = math.exp(-sum(want[-4096:]) / len(want[-4096:]))
        row["verdict"] = "same" if row["mean_abs_delta"] <= SAME else "different"
    elif not run.get("loaded") or not got:
        row["verdict"] = "refuses"
    elif row.get("mean_abs_delta_to_unextended", 1.0) <= SAME:
        row["verdict"] = "different"  # loads and runs, but computes the unextended model
    else:
        row["verdict"] = "no reference"
    return row


def summarize(workdir: Path) -> dict:
    matrix = {"model": "SmolLM2-135M-Instruct (pretrained 8192 tokens, rope_theta 1e5), fp32",
              "text": (workdir / "text.txt").read_text(), "tokens": TOKENS, "same_if_mean_abs_delta_at_most": SAME,
              "cases": {}}
    unextended_file = workdir / "none" / "transformers.json"
    unextended = json.loads(unextended_file.read_text()) if unextended_file.is_file() else None
    for case, (method, factor, options) in CASES.items():
        folder = workdir / case
        if not folder.is_dir():
            continue
        rows = {}
        for name, runner, _, count in runs_for(case, method, options):
            file = folder / f"{name}.json"
            if not file.is_file():
                continue
            run = json.loads(file.read_text())
            reference_name = "transformers-8k" if count == SHORT_TOKENS else "transformers"
            if name == reference_name:
                rows[name] = {key: run.get(key) for key in ("max_length", "seconds", "trust_remote_code")}
            else:
                reference = folder / f"{reference_name}.json"
                rows[name] = compare(json.loads(reference.read_text()) if reference.is_file() else None, run,
                                     unextended if count == TOKENS else None)
            rows[name]["tokens"] = count
            for key in ("converter_warnings", "metadata", "runtime_options", "version", "completed_with"):
                if run.get(key):
                    rows[name][key] = run[key]
        matrix["cases"][case] = {"method": method, "factor": factor, "options": options, "runs": rows}
    return matrix


def merged(committed: dict | None, measured: dict) -> dict:
    """The committed matrix with every run measured now put in its place."""
    if committed is None:
        return measured
    matrix = {**committed, **{k: v for k, v in measured.items() if k != "cases"}, "cases": {}}
    for case in CASES:
        old, new = committed["cases"].get(case), measured["cases"].get(case)
        if old is None and new is None:
            continue
        entry = dict(new or old)
        runs = dict((old or {}).get("runs", {}))
        runs.update((new or {}).get("runs", {}))
        entry["runs"] = {name: runs[name] for name in _run_order(case, runs)}
        matrix["cases"][case] = entry
    return matrix


def _run_order(case, runs):
    method, _, options = CASES[case]
    listed = [name for name, *_ in runs_for(case, method, options)]
    return [name for name in listed if name in runs] + [name for name in runs if name not in listed]


def markdown(matrix: dict) -> str:
    lines = [f"Model: {matrix['model']}. Text: {matrix['text']}, {matrix['tokens']} tokens. `same` = mean |Δ "
             f"log-prob| per token ≤ {matrix['same_if_mean_abs_delta_at_most']} against plain transformers.", "",
             "| case | engine | loads | max length | mean \\|Δ\\| | past 8192 | ppl last 4096 (reference) "
             "| \\|Δ\\| to unextended | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case, entry in matrix["cases"].items():
        for name, row in entry["runs"].items():
            if "verdict" not in row:
                continue
            ppl = (f"{row['ppl_last_4096']:.4f} ({row['reference_ppl_last_4096']:.4f})"
                   if "reference_ppl_last_4096" in row else "")
            delta = f"{row['mean_abs_delta']:.2g}" if "mean_abs_delta" in row else ""
            past = f"{row['mean_abs_delta_past_8192']:.2g}" if "mean_abs_delta_past_8192" in row else ""
            plain = (f"{row['mean_abs_delta_to_unextended']:.2g}" if "mean_abs_delta_to_unextended" in row else "")
            verdict = row["verdict"] + (f": {row['error'][:160]}" if row.get("error") else "")
            lines.append(f"| {case} | {name} ({row['tokens']} tokens) | {'yes' if row.get('loaded') else 'no'} "
                         f"| {row.get('max_length', row.get('derived_max_length', ''))} | {delta} | {past} | {ppl} | {plain} | {verdict} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--vllm-python", default=None, help="needed unless --engines leaves vLLM out")
    parser.add_argument("--llama-python", default=None, help="needed unless --engines leaves llama.cpp out")
    parser.add_argument("--converter", default=None, help="llama.cpp's convert_hf_to_gguf.py (with --llama-python)")
    parser.add_argument("--only", default=None, help="comma-separated case names")
    parser.add_argument("--engines", default=None, help="comma-separated engines to run: vllm, llama.cpp (default: "
                                                        "both; the transformers reference always runs)")
    args = parser.parse_args()
    cases = ["none"] + [c for c in args.only.split(",") if c != "none"] if args.only else list(CASES)
    engines = args.engines.split(",") if args.engines else ["vllm", "llama.cpp"]
    unknown = [c for c in cases if c not in CASES] + [e for e in engines if e not in ("vllm", "llama.cpp")]
    if unknown:
        parser.error(f"unknown case or engine {unknown}; cases: {', '.join(CASES)}; engines: vllm, llama.cpp")
    if "vllm" in engines and not args.vllm_python or "llama.cpp" in engines and not (args.llama_python
                                                                                        and args.converter):
        parser.error("give --vllm-python, and --llama-python with --converter, for the engines run (or leave an "
                     "engine out with --engines)")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokens = make_tokens(workdir)
    for case in cases:  # "none" first: the unextended reference every case is compared with
        method, factor, options = CASES[case]
        checkpoint = make_checkpoint(workdir, case)
        (workdir / case).mkdir(exist_ok=True)
        for name, runner, extra, count in runs_for(case, method, options):
            out = workdir / case / f"{name}.json"
            if out.is_file() or (runner != "transformers" and runner not in engines):
                continue
            started = time.perf_counter()
            run_engine(args, runner, checkpoint, tokens[count], out, extra)
            print(f"{case} {name}: {time.perf_counter() - started:.0f} s", flush=True)
    committed_file = RESULTS / "engine_matrix.json"
    committed = json.loads(committed_file.read_text()) if committed_file.is_file() else None
    matrix = merged(committed, summarize(workdir))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine_matrix.json").write_text(json.dumps(matrix, indent=1) + "\n")
    (RESULTS / "engine_matrix.md").write_text(markdown(matrix))
    print(markdown(matrix))


if __name__ == "__main__":
    main()
