"""Passkey retrieval (Mohtashami & Jaggi 2023): a number hidden in filler text, asked for at the end."""
from __future__ import annotations

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tokenizer, num_tokens: int, passkey: int, depth: float = 0.5) -> str:
    """A prompt of about `num_tokens` tokens with the pass key at relative `depth` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    question = "What is the pass key? The pass key is"
    fixed = len(tokenizer(head + needle + question).input_ids)
    per_filler = len(tokenizer(FILLER * 20).input_ids) / 20
    repeats = max(int((num_tokens - fixed) / per_filler), 1)
    before = int(repeats * depth)
    return head + FILLER * before + needle + FILLER * (repeats - before) + question


def passkey_trial(model, tokenizer, num_tokens: int, depth: float = 0.5, seed: int = 0) -> dict:
    """Greedy-decode the answer; returns the key, what the model said, prompt length and success."""
    import torch

    passkey = random.Random(seed).randint(10000, 99999)
    ids = tokenizer(passkey_prompt(tokenizer, num_tokens, passkey, depth), return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids.to(model.device), max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return {"passkey": passkey, "answer": answer.strip(), "tokens": ids.shape[1], "found": str(passkey) in answer}


def passkey_grid(model, tokenizer, lengths, depths, trials: int = 1, seed: int = 0, progress: bool = True) -> list:
    """Accuracy for every (length, depth) cell over `trials` random keys (trial t uses seed + t in every cell, so
    cells differ only by length and depth). Returns one dict per cell, answers included."""
    from tqdm.auto import tqdm

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an int >= 1, got {trials!r}")
    cells = [(length, depth) for length in lengths for depth in depths]
    bar = tqdm(total=len(cells) * trials, desc="passkey", disable=not progress)
    results = []
    for length, depth in cells:
        outcomes = []
        for trial in range(trials):
            outcomes.append(passkey_trial(model, tokenizer, length, depth, seed=seed + trial))
            bar.update()
        correct = sum(outcome["found"] for outcome in outcomes)
        results.append({"length": length, "depth": depth, "trials": trials, "correct": correct,
                        "accuracy": correct / trials, "prompt_tokens": [o["tokens"] for o in outcomes],
                        "answers": [{"passkey": o["passkey"], "answer": o["answer"]} for o in outcomes]})
    bar.close()
    return results
