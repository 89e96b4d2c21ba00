"""LongRoPE2's needle-driven fitness (Shang et al. 2025, arXiv 2502.20082): perplexity of answers only the long
context holds.

Plain perplexity over a long document is dominated by tokens that a few hundred tokens of context predict well, so
it barely rewards factors that keep distant positions usable. Here each calibration window carries `needles`
sentences "The special magic number for {key} is: {value}." spliced in at spread depths, and ends with one
question line per needle, in another order. The fitness is the perplexity of the value tokens of those answer
lines alone: the model can only predict them by retrieving the needle from far back.

Deterministic: sample i depends only on the seed, i and the calibration tokens. The pieces (haystack, needles,
questions, values) are encoded separately and joined as token ids, so that the scored positions are exact; with a
SentencePiece tokenizer that adds a prefix space to every encoded piece, each join then carries one.
"""
from __future__ import annotations

from dataclasses import dataclass
from random import Random

NEEDLE = "\nThe special magic number for {key} is: {value}.\n"
QUESTION = "\nThe special magic number for {key} mentioned above is:"
VALUE, END = " {value}", "."


@dataclass
class NeedleSample:
    input_ids: list  # exactly the target length
    scored: list  # positions of the answer value tokens (what the fitness scores)
    needles: list  # (key, value, depth): what was hidden where


def needle_samples(encode, calibration_ids, length: int, count: int, seed: int, needles: int = 4) -> list:
    """`count` samples of `length` tokens, each from its own window of `calibration_ids` (from the end, like the
    perplexity fitness). `encode(text) -> token ids` (no special tokens) is the model's tokenizer."""
    samples, space = [], encode(" ")
    for index in range(count):
        rng = Random(f"{seed}/needles/{index}")
        keys = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8)) for _ in range(needles)]
        values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in range(needles)]
        depths = sorted((j + rng.random()) / needles for j in range(needles))
        tail, scored_offsets = [], []
        order = rng.sample(range(needles), needles)
        if needles > 1 and order == sorted(order):  # never asked in the order hidden
            order = order[1:] + order[:1]
        for j in order:
            tail += encode(QUESTION.format(key=keys[j]))
            value_ids = encode(VALUE.format(value=values[j]))
            skip = len(space) if value_ids[:len(space)] == space else 0  # a separate space token is no answer
            scored_offsets += [len(tail) + k for k in range(skip, len(value_ids))]
            tail += value_ids + encode(END)
        hidden = [encode(NEEDLE.format(key=keys[j], value=values[j])) for j in range(needles)]
        haystack_size = length - len(tail) - sum(len(h) for h in hidden)
        if haystack_size < needles:
            raise ValueError(f"the target length {length} is too short for {needles} needles and their questions")
        stop = len(calibration_ids) - index * length
        start = stop - haystack_size
        if start < 0:
            raise ValueError(f"calibration text has {len(calibration_ids)} tokens; the needle fitness needs {count} x "
                             f"{length}: give a longer text")
        haystack = [int(t) for t in calibration_ids[start:stop]]
        ids, previous = [], 0
        for depth, needle in zip(depths, hidden):
            cut = max(previous, int(depth * haystack_size))
            ids += haystack[previous:cut] + needle
            previous = cut
        ids += haystack[previous:]
        scored = [len(ids) + offset for offset in scored_offsets]
        ids += tail
        samples.append(NeedleSample(input_ids=ids, scored=scored,
                                    needles=[(keys[j], values[j], round(depths[j], 4)) for j in range(needles)]))
    return samples
