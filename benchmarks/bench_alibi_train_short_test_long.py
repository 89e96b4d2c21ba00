"""Train short, test long (ALiBi paper, arXiv 2108.12409 §4): two tiny LLaMA models, ALiBi vs RoPE, trained on the
same bytes of Python stdlib sources at 128 tokens, then perplexity at 128/256/512/1024 tokens on held-out files.

Same initial weights (same seed), same batches, same steps; only the position scheme differs.
Run: python benchmarks/bench_alibi_train_short_test_long.py [--steps 250]   (a few CPU minutes)
"""
from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longctx_hf import alibi_model_from_config

TRAIN_LENGTH = 128
EVAL_LENGTHS = (128, 256, 512, 1024)
EVAL_TOKENS = 16384  # per length: the same held-out bytes, cut into windows of that length


def stdlib_bytes():
    """Byte-level text (vocab 256, no tokenizer needed): training files, then held-out files."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    held_out = [f for i, f in enumerate(files) if i % 10 == 0]
    train = [f for i, f in enumerate(files) if i % 10 != 0]

    def read(paths):
        return torch.tensor(list(b"\n".join(p.read_bytes() for p in paths)), dtype=torch.long)

    return read(train), read(held_out)


def config():
    return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=TRAIN_LENGTH,
                       pad_token_id=None, bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)


def train(model, data, steps, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - TRAIN_LENGTH - 1, (batch,), generator=generator)
        ids = torch.stack([data[s:s + TRAIN_LENGTH] for s in starts.tolist()])
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


@torch.no_grad()
def perplexity(model, data, length):
    """exp(mean next-token loss over every position of non-overlapping windows of `length` tokens)."""
    windows = data[: (EVAL_TOKENS // length) * length].view(-1, length)
    total = 0.0
    for chunk in windows.split(max(1, 4096 // length)):
        total += model(chunk, labels=chunk).loss.item() * len(chunk)
    return math.exp(total / len(windows))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--plot", default=str(Path(__file__).with_name("alibi_train_short_test_long.png")))
    args = parser.parse_args()
    torch.manual_seed(0)
    train_data, eval_data = stdlib_bytes()
    print(f"train {len(train_data)/1e6:.1f}M bytes, held-out {len(eval_data)/1e6:.1f}M bytes; "
          f"{args.steps} steps x {args.batch} x {TRAIN_LENGTH} tokens each")
    results = {}
    for name in ("rope", "alibi"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config()) if name == "rope" else alibi_model_from_config(config())
        started = time.perf_counter()
        last = train(model, train_data, args.steps, args.batch, seed=1)
        seconds = time.perf_counter() - started
        results[name] = [perplexity(model, eval_data, n) for n in EVAL_LENGTHS]
        print(f"{name:5s} trained {seconds:.0f} s (last loss {last:.3f}); ppl at "
              + ", ".join(f"{n}: {p:.3f}" for n, p in zip(EVAL_LENGTHS, results[name])))
    print("\n| tokens | " + " | ".join(str(n) for n in EVAL_LENGTHS) + " |")
    print("|---|" + "---|" * len(EVAL_LENGTHS))
    for name, values in results.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, values in results.items():
        ax.plot(EVAL_LENGTHS, values, marker="o", label=f"{name} (trained at {TRAIN_LENGTH})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(EVAL_LENGTHS, [str(n) for n in EVAL_LENGTHS])
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("byte-level perplexity (held-out)")
    ax.set_title("Train short, test long: ALiBi vs RoPE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
