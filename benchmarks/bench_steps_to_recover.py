"""Steps to recover (the YaRN paper's fine-tuning-efficiency claim, arXiv 2309.00071 §4, at a size this CPU trains):
how many fine-tuning steps at 4L does each extension method need to reach the quality of a model trained at 4L?

1. A small LLaMA (byte-level, 4 layers, RoPE θ 1e4) is pretrained from scratch at L = 128 tokens on Python stdlib
   sources; a second one, identical but for its 4L = 512 context, is trained on the same number of tokens at 4L:
   the ceiling. Both are cached in --work.
2. For each method at ×4 (pi, ntk, yarn, and longrope with factors searched on the L-model by
   `search_rope_factors`): perplexity of held-out 512-token windows zero-shot, then after 25/50/100/200 steps of
   `longctx_hf.finetune` at 512 tokens (one run per method, constant learning rate after a short warmup,
   checkpoints every 25 steps).
3. The ceiling at equal steps: the 4L model trained on with the same settings and the same number of tokens (its
   own loop, random windows of the same training text). These models are far from converged, so the extra tokens
   alone lower perplexity; comparing at equal steps separates that from the recovery.

Held-out text: stdlib files i % 10 == 1 (training: i % 10 >= 2; the longrope search calibrates on i % 10 == 0).
Run: python benchmarks/bench_steps_to_recover.py [--work DIR] [--report-only]   (about 15 minutes here)
Writes DIR/results.json, benchmarks/results/steps_to_recover.{json,md} and benchmarks/steps_to_recover.png.
"""
from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longctx_hf import extend_context, finetune, search_rope_factors

L = 128
FACTOR = 4
TARGET = FACTOR * L
PRETRAIN_STEPS = 1000
PRETRAIN_TOKENS_PER_STEP = 16 * L  # both pretrained models see the same tokens per step (16 x L or 4 x 4L)
CHECKPOINTS = (25, 50, 100, 200)
METHODS = ("pi", "ntk", "yarn", "longrope")
FINETUNE = dict(learning_rate=5e-4, lr_scheduler="constant", warmup_steps=5, batch_size=4, seed=0)
EVAL_WINDOWS = 48
RESULTS = Path(__file__).with_name("results")


def stdlib_files(part):
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [f for i, f in enumerate(files) if part(i % 10)]


def byte_tokenizer():
    """One token per byte (GPT-2's byte-to-unicode alphabet, no merges) plus <eos>: what finetune tokenizes with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator(["x"], trainers.BpeTrainer(vocab_size=len(alphabet) + 1, special_tokens=["<eos>"],
                                                           initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def token_ids(tokenizer, files):
    return torch.tensor(tokenizer("\n".join(f.read_text(errors="replace") for f in files))["input_ids"])


def train_step(model, optimizer, schedule, train_ids, length, batch, generator):
    """One step on `batch` random windows of `length` training tokens (gradient clipping 1.0)."""
    starts = torch.randint(0, len(train_ids) - length, (batch,), generator=generator)
    ids = torch.stack([train_ids[s:s + length] for s in starts.tolist()])
    model(ids, labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()


def pretrain(folder: Path, length: int, tokenizer, train_ids) -> float:
    """Train from scratch on random windows of `length` tokens; cached in `folder`."""
    if (folder / "model.safetensors").is_file():
        return json.loads((folder / "pretrain.json").read_text())["seconds"]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=length,
                         rope_theta=1e4, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50)
                                                 * 0.5 * (1 + math.cos(math.pi * s / PRETRAIN_STEPS)))
    generator = torch.Generator().manual_seed(1)
    batch = PRETRAIN_TOKENS_PER_STEP // length
    started = time.perf_counter()
    model.train()
    for step in range(PRETRAIN_STEPS):
        train_step(model, optimizer, schedule, train_ids, length, batch, generator)
        if step % 200 == 0:
            print(f"  pretrain {length}: step {step}", flush=True)
    seconds = time.perf_counter() - started
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "pretrain.json").write_text(json.dumps({"seconds": seconds, "steps": PRETRAIN_STEPS,
                                                      "length": length, "batch": batch}))
    return seconds


def held_out_ppl(model, held_out_ids) -> dict:
    """Perplexity of EVAL_WINDOWS non-overlapping held-out windows of TARGET tokens: of every predicted token
    ("all"), and of the last quarter only ("last_quarter": positions 3·TARGET/4 and later, all far past L), which
    local context alone cannot explain as much."""
    windows = held_out_ids[: EVAL_WINDOWS * TARGET].reshape(EVAL_WINDOWS, TARGET)
    model.eval()
    nll = []
    with torch.no_grad():
        for chunk in windows.split(8):
            logits = model(chunk).logits[:, :-1].float()
            nll.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none"))
    nll = torch.cat(nll)  # (windows, TARGET - 1): entry p is the loss of token p + 1
    return {"all": math.exp(nll.mean().item()), "last_quarter": math.exp(nll[:, 3 * TARGET // 4 - 1:].mean().item())}


def searched_factors(base: Path, work: Path, tokenizer) -> dict:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    calibration = token_ids(tokenizer, stdlib_files(lambda k: k == 0))
    result = search_rope_factors(model, calibration, factor=FACTOR, output_dir=work / "search", budget=40,
                                 documents=16, calibration_text="stdlib *.py files i % 10 == 0",
                                 evaluation_text="stdlib *.py files i % 10 == 1", progress=False)
    return {"long_factor": list(result.best["long_factor"]), "attention_factor": result.best["attention_factor"]}


def curve(method, options, base: Path, work: Path, train_file: Path, held_out_ids) -> dict:
    zero_shot = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    extend_context(zero_shot, method, FACTOR, **options)
    points = {0: held_out_ppl(zero_shot, held_out_ids)}
    output = work / f"finetune-{method}"
    if not (output / "trainer_state.json").is_file():
        finetune(str(base), method=method, factor=FACTOR, method_options=options, data=str(train_file),
                 max_length=TARGET, steps=max(CHECKPOINTS), save_steps=CHECKPOINTS[0], output_dir=str(output),
                 progress_bar=False, **FINETUNE)
    for step in CHECKPOINTS:
        folder = output if step == max(CHECKPOINTS) else output / f"checkpoint-{step}"
        weights = load_file(folder / "model.safetensors")
        missing, unexpected = zero_shot.load_state_dict(weights, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        points[step] = held_out_ppl(zero_shot, held_out_ids)
    state = json.loads((output / "trainer_state.json").read_text())
    return {"ppl": points, "train_runtime": state["log_history"][-1]["train_runtime"]}


def ceiling_curve(ceiling: Path, train_ids, held_out_ids) -> dict:
    """The 4L-trained model trained on for the same steps with the same settings: what the extra fine-tuning tokens
    alone do (the small models are far from converged), so that every method is compared at equal steps."""
    model = AutoModelForCausalLM.from_pretrained(ceiling, dtype=torch.float32)
    points = {0: held_out_ppl(model, held_out_ids)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=FINETUNE["learning_rate"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, s / FINETUNE["warmup_steps"]))
    generator = torch.Generator().manual_seed(FINETUNE["seed"])
    for step in range(1, max(CHECKPOINTS) + 1):
        model.train()
        train_step(model, optimizer, schedule, train_ids, TARGET, FINETUNE["batch_size"], generator)
        if step in CHECKPOINTS:
            points[step] = held_out_ppl(model, held_out_ids)
    return {"ppl": points}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/longctx-steps-to-recover")
    parser.add_argument("--report-only", action="store_true", help="table and plot from WORK/results.json")
    args = parser.parse_args()
    work = Path(args.work)
    if args.report_only:
        return report(json.loads((work / "results.json").read_text()))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    tokenizer = byte_tokenizer()
    train_ids = token_ids(tokenizer, stdlib_files(lambda k: k >= 2))
    held_out_ids = token_ids(tokenizer, stdlib_files(lambda k: k == 1))
    train_file = work / "train.txt"
    if not train_file.is_file():  # finetune's data: the same training files, one document
        train_file.write_text("\n".join(f.read_text(errors="replace") for f in stdlib_files(lambda k: k >= 2)))
    print(f"train {len(train_ids) / 1e6:.1f}M tokens, held-out {len(held_out_ids) / 1e6:.1f}M tokens")

    base, ceiling = work / f"pretrained-{L}", work / f"pretrained-{TARGET}"
    seconds = {n: pretrain(folder, n, tokenizer, train_ids) for n, folder in ((L, base), (TARGET, ceiling))}
    results = {"setup": {"L": L, "factor": FACTOR, "pretrain_steps": PRETRAIN_STEPS,
                         "pretrain_tokens_per_step": PRETRAIN_TOKENS_PER_STEP, "pretrain_seconds": seconds,
                         "finetune": FINETUNE, "eval_windows": EVAL_WINDOWS, "eval_length": TARGET},
               "unextended_ppl": held_out_ppl(AutoModelForCausalLM.from_pretrained(base), held_out_ids),
               "methods": {}}
    print(f"unextended L-model at {TARGET}: {results['unextended_ppl']}")
    factors_file = work / "longrope_factors.json"
    if not factors_file.is_file():
        factors_file.write_text(json.dumps(searched_factors(base, work, tokenizer)))
    for method in METHODS:
        options = json.loads(factors_file.read_text()) if method == "longrope" else {}
        started = time.perf_counter()
        results["methods"][method] = curve(method, options, base, work, train_file, held_out_ids)
        print(f"{method}: {results['methods'][method]['ppl']} ({time.perf_counter() - started:.0f} s)", flush=True)
    results["ceiling"] = ceiling_curve(ceiling, train_ids, held_out_ids)
    print(f"ceiling trained on: {results['ceiling']['ppl']}", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    report(json.loads((work / "results.json").read_text()))  # one form (string keys) for both routes


METRICS = {"all": "every token of the window", "last_quarter": f"the last quarter (positions {3 * TARGET // 4}+)"}


def report(results):
    steps = (0, *CHECKPOINTS)
    lines = [f"Held-out perplexity at {TARGET} tokens (×{FACTOR} of L = {L}) after fine-tuning steps at {TARGET}. "
             "Last column: the first step at which a method is within 2% of the best perplexity any method reaches "
             f"after {steps[-1]} steps."]
    for metric, what in METRICS.items():
        ceiling = {int(k): v[metric] for k, v in results["ceiling"]["ppl"].items()}
        curves = {m: {int(k): v[metric] for k, v in d["ppl"].items()} for m, d in results["methods"].items()}
        best = min(ppl[steps[-1]] for ppl in curves.values())
        lines += ["", f"Perplexity of {what}; the L-model unextended: {results['unextended_ppl'][metric]:.3f}; "
                  f"best after {steps[-1]} steps: {best:.3f}.", "",
                  "| model | " + " | ".join(f"{s} steps" for s in steps) + " | within 2% of the best |",
                  "|---|" + "---|" * (len(steps) + 1)]
        for method, ppl in curves.items():
            within = next((s for s in steps if ppl[s] <= 1.02 * best), None)
            lines.append(f"| {method} | " + " | ".join(f"{ppl[s]:.3f}" for s in steps)
                         + f" | {within if within is not None else f'> {steps[-1]}'} |")
        lines.append(f"| trained at {TARGET} from the start (same tokens), trained on likewise | "
                     + " | ".join(f"{ceiling[s]:.3f}" for s in steps) + " | |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "steps_to_recover.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "steps_to_recover.md").write_text(table + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, (metric, what) in zip(axes, METRICS.items()):
        for method, data in results["methods"].items():
            ax.plot(steps, [data["ppl"][str(s)][metric] for s in steps], marker="o", label=method)
        ax.plot(steps, [results["ceiling"]["ppl"][str(s)][metric] for s in steps], color="black", linestyle="--",
                marker=".", label=f"trained at {TARGET} from the start")
        ax.set_xscale("symlog", linthresh=25)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_yscale("log")
        ax.set_yticks([4, 5, 7, 10, 15, 25])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"fine-tuning steps at {TARGET} tokens")
        ax.set_title(f"perplexity of {what}", fontsize=10)
    axes[0].set_ylabel("held-out perplexity")
    axes[0].legend()
    fig.suptitle(f"Steps to recover, ×{FACTOR} (L = {L})")
    fig.tight_layout()
    fig.savefig(Path(__file__).with_name("steps_to_recover.png"), dpi=120)


if __name__ == "__main__":
    main()
