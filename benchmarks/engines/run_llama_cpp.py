"""Prompt log-probabilities of one checkpoint in llama.cpp (llama-cpp-python), after llama.cpp's own converter.

Runs in its own venv (see docs/engines.md): converts CHECKPOINT with `convert_hf_to_gguf.py --outtype f32`, loads
the GGUF, records the context length the converter wrote and the rope metadata, and evaluates the prompt.
`--yarn-beta-fast` etc. and `--kv-override KEY=VALUE` are llama.cpp's own load-time settings, for checking the
ones a warning recommends. `--complete-with PYTHON` runs `longctx-hf gguf` (with that interpreter, which has
longctx_hf) on the converted file before loading it: the fix the longrope warning recommends.

    python run_llama_cpp.py CHECKPOINT TOKENS.json OUT.json --converter PATH/convert_hf_to_gguf.py [--yarn-...]
        [--complete-with PYTHON]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUNTIME_OPTIONS = ("yarn_beta_fast", "yarn_beta_slow", "yarn_attn_factor", "yarn_ext_factor")


def log_softmax_rows(scores: np.ndarray, targets: list[int]) -> list[float]:
    out = []
    for start in range(0, len(targets), 1024):
        rows = scores[start:start + 1024].astype(np.float64)
        rows -= rows.max(axis=1, keepdims=True)
        norm = np.log(np.exp(rows).sum(axis=1))
        picked = rows[np.arange(len(rows)), targets[start:start + 1024]]
        out.extend((picked - norm).tolist())
    return out


def _last_line(text):
    lines = (text or "").strip().splitlines()
    return lines[-1][:600] if lines else "(no output)"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("tokens")
    parser.add_argument("out")
    parser.add_argument("--converter", required=True)
    for name in RUNTIME_OPTIONS:
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    parser.add_argument("--complete-with", default=None, metavar="PYTHON",
                        help="complete the converted GGUF with `PYTHON -m longctx_hf.cli gguf` before loading it")
    parser.add_argument("--kv-override", action="append", default=[], metavar="KEY=FLOAT",
                        help="a GGUF metadata value replaced at load (llama_cpp.Llama's kv_overrides)")
    args = parser.parse_args()
    ids = json.loads(open(args.tokens).read())
    runtime = {name: getattr(args, name) for name in RUNTIME_OPTIONS if getattr(args, name) is not None}
    overrides = {key: float(value) for key, value in (item.split("=", 1) for item in args.kv_override)}
    if overrides:
        runtime["kv_overrides"] = overrides
    result = {"engine": "llama.cpp", "runtime_options": runtime}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "model.gguf"
        converted = subprocess.run([sys.executable, args.converter, args.checkpoint, "--outfile", str(gguf),
                                    "--outtype", "f32"], capture_output=True, text=True)
        result["converter_warnings"] = [line.split(":", 2)[-1].strip() for line in converted.stderr.splitlines()
                                        if line.startswith("WARNING")]
        if converted.returncode == 0 and args.complete_with:
            completed = Path(tmp) / "completed.gguf"
            done = subprocess.run([args.complete_with, "-m", "longctx_hf.cli", "gguf", args.checkpoint, str(gguf),
                                   "--output", str(completed)], capture_output=True, text=True)
            result["completed_with"] = done.stdout.strip()
            if done.returncode != 0:
                result.update(loaded=False, error="longctx-hf gguf: " + _last_line(done.stderr))
            gguf = completed
        if converted.returncode != 0:
            result.update(loaded=False, error="converter: " + _last_line(converted.stderr))
        elif "error" not in result:
            try:
                import llama_cpp

                result["version"] = llama_cpp.__version__
                llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(ids) + 16, n_batch=512, n_threads=2,
                                      logits_all=True, verbose=False, **runtime)
                result["loaded"] = True
                result["metadata"] = {k: v for k, v in llm.metadata.items() if "rope" in k or "context_length" in k}
                result["max_length"] = int(next(v for k, v in llm.metadata.items() if k.endswith(".context_length")))
                llm.eval(ids)
                result["logprobs"] = log_softmax_rows(np.asarray(llm.scores[:len(ids) - 1]), ids[1:])
            except Exception as err:
                result.setdefault("loaded", False)
                result["error"] = f"{type(err).__name__}: {err}"[:600]
    result["seconds"] = time.perf_counter() - started
    open(args.out, "w").write(json.dumps(result))


if __name__ == "__main__":
    main()
