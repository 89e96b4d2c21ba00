"""Offline `longctx-hf extend` vs load + extend_context + save_pretrained, on a ~1.5 GB sharded LLaMA checkpoint.

Both run as subprocesses, the way users run them (so both include their own imports); each is timed from
spawn to exit, best of --repeats, page cache warm (the checkpoint is read once before timing). Peak memory is
the subprocess's own max RSS (os.wait4). Checks: weights byte-identical (sha256), config.json identical, and
both outputs reload in a fresh process that never imports longctx_hf to torch.equal logits.
All files are deleted at the end.

    python benchmarks/bench_extend_offline.py [--layers 14] [--repeats 3] [--keep]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IN_MEMORY = r"""
import sys, time
start = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
from longctx_hf import extend_context
imported = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
loaded = time.perf_counter()
extend_context(model, "yarn", 4)
extended = time.perf_counter()
model.save_pretrained(sys.argv[2], max_shard_size="400MB")
saved = time.perf_counter()
print(f"  in-memory phases: import {imported - start:.2f} s, load {loaded - imported:.2f} s, "
      f"extend_context {1000 * (extended - loaded):.1f} ms, save {saved - extended:.2f} s")
"""

RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
ids = torch.randint(0, 32000, (1, 128))
logits = []
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits.append(model(ids).logits)
    del model
assert not any(name.startswith("longctx_hf") for name in sys.modules), "longctx_hf was imported"
print(json.dumps(all(torch.equal(logits[0], other) for other in logits[1:])))
"""


BUILD = r"""
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, LlamaConfig
config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=int(sys.argv[2]),
                     num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096,
                     rope_theta=10000.0)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1], max_shard_size="400MB")
(Path(sys.argv[1]) / "tokenizer_config.json").write_text("{}")
"""


def run_timed(command, env) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of that child alone, stdout)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    out, err = process.stdout.read(), process.stderr.read()
    if process.returncode:
        raise RuntimeError(f"{command} failed:\n{err[-3000:]}")
    return elapsed, usage.ru_maxrss * 1024, out


def weights(folder: Path) -> dict:
    hashes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as file:
            hashes[path.name] = hashlib.file_digest(file, "sha256").hexdigest()
    return hashes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=14, help="14 layers of a 2048-wide LLaMA: 1.55 GB in bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="do not delete the checkpoints")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-extend-offline-", dir=Path.home() / ".cache"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cli = [str(Path(sys.executable).parent / "longctx-hf")]
    try:
        src = root / "src"
        # Built in a subprocess: a child's max RSS starts at its parent's RSS at fork time, so this process
        # must stay small (no torch, no model, files hashed in chunks) for the children's peaks to mean anything.
        subprocess.run([sys.executable, "-c", BUILD, str(src), str(args.layers)], check=True, capture_output=True)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        print(f"checkpoint: {size / 1e9:.2f} GB in {len(list(src.glob('*.safetensors')))} shards ({src})")
        source_hashes = weights(src)  # also warms the page cache for both paths

        offline_times, offline_rss = [], 0
        for i in range(args.repeats):
            elapsed, rss, _ = run_timed([*cli, "extend", str(src), "--method", "yarn", "--factor", "4",
                                         "--output", str(root / "offline"), "--overwrite"], env)
            offline_times.append(elapsed)
            offline_rss = max(offline_rss, rss)
        memory_times, memory_rss = [], 0
        for i in range(args.repeats):
            shutil.rmtree(root / "in_memory", ignore_errors=True)
            elapsed, rss, out = run_timed([sys.executable, "-c", IN_MEMORY, str(src), str(root / "in_memory")], env)
            print(out.rstrip())
            memory_times.append(elapsed)
            memory_rss = max(memory_rss, rss)

        offline, memory = min(offline_times), min(memory_times)
        print(f"offline `longctx-hf extend` (subprocess): best {offline:.3f} s of "
              f"{[round(t, 3) for t in offline_times]}, peak RSS {offline_rss / 1e6:.0f} MB "
              f"({offline_rss / size:.1%} of the checkpoint)")
        print(f"load + extend_context + save_pretrained (subprocess): best {memory:.2f} s of "
              f"{[round(t, 2) for t in memory_times]}, peak RSS {memory_rss / 1e6:.0f} MB")
        print(f"speed-up: {memory / offline:.1f}x (target >= 10x, aim 50x)")
        print(f"peak memory <= half the checkpoint: {offline_rss <= size / 2}")
        print(f"weights sha256 identical to the source: {weights(root / 'offline') == source_hashes}")
        same_config = (root / "offline/config.json").read_bytes() == (root / "in_memory/config.json").read_bytes()
        print(f"config.json identical to the in-memory path's: {same_config}")
        out = subprocess.run([sys.executable, "-c", RELOAD, str(root / "offline"), str(root / "in_memory")],
                             capture_output=True, text=True, env={**os.environ})
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        import resource

        own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        print(f"(this benchmark process's own peak RSS: {own_peak:.0f} MB)")
        print(f"fresh-process reload, offline vs in-memory logits torch.equal: {json.loads(out.stdout.strip())}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
