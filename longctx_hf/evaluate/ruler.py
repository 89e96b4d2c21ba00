"""Running RULER samples through a model, scoring them as RULER does, and the effective context length.

Cost is what it has to be: one prefill per sample with a KV cache, greedy decoding of at most the answer's tokens plus
a margin (stopping early at EOS), rows of equal length batched together, and a progress bar weighted by an estimate
of each prompt's work (its attention grows with the square of its length), so that its ETA means something when
lengths differ.
"""
from __future__ import annotations

import re
import time

from .ruler_tasks import ABSOLUTE_THRESHOLD, RELATIVE_THRESHOLD, TASKS


def string_match_all(prediction: str, answers: list) -> float:
    """RULER's string_match_all for one sample: the fraction of references found (case-insensitive) in the output."""
    return sum(answer.lower() in prediction.lower() for answer in answers) / len(answers)


def string_match_part(prediction: str, answers: list) -> float:
    """RULER's string_match_part for one sample: 1 if any reference is found in the output."""
    return float(any(answer.lower() in prediction.lower() for answer in answers))


METRICS = {"all": string_match_all, "part": string_match_part}


def clean_prediction(text: str) -> str:
    """RULER's post-processing: control characters become newlines, surrounding whitespace goes."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


def _batches(samples, batch_size: int):
    """Consecutive runs of samples with the same prompt length and answer budget, at most `batch_size` each."""
    batch = []
    for sample in samples:
        if batch and (len(batch) == batch_size or len(sample.input_ids) != len(batch[0].input_ids)
                      or sample.max_new_tokens != batch[0].max_new_tokens):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


DECODE_STEP_WORK = 64  # one greedy step costs about as much as prefilling 64 prompt tokens (SmolLM2, this CPU)


def attention_span(model) -> float:
    """The prompt length n at which a prefill's attention work equals its weights' work: per token, 2·P FLOPs for
    P parameters against about 2·n·d per layer for causal attention (QKᵀ and AV over n/2 keys on average), so
    n = P / (d · layers), halved because the attention kernels run at about half the matmuls' rate on CPU
    (SmolLM2-135M, this CPU: a 4k prefill about 10 s, a 16k one 1–2 minutes; this span, 3892, gives 10×)."""
    config = model.config.get_text_config()
    parameters = sum(p.numel() for p in model.parameters())
    return parameters / (2 * config.hidden_size * config.num_hidden_layers)


def work(sample, span: float) -> float:
    """A sample's estimated cost in prompt-token units: the prefill (weights plus quadratic attention) and at most
    its answer budget of greedy steps."""
    n = len(sample.input_ids)
    return n * (1 + n / span) + DECODE_STEP_WORK * sample.max_new_tokens


def generate(model, tokenizer, samples, batch_size: int = 4, bar=None, span=None) -> list:
    """Greedy outputs (decoded, cleaned) for `samples`, in order; `bar` advances by `work` (with `span`)."""
    import torch

    if bar is not None and span is None:
        span = attention_span(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for batch in _batches(samples, batch_size):
        ids = torch.tensor([sample.input_ids for sample in batch], device=model.device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=batch[0].max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        for row in out[:, ids.shape[1]:]:
            outputs.append(clean_prediction(tokenizer.decode(row, skip_special_tokens=True)))
        if bar is not None:
            bar.update(sum(work(sample, span) for sample in batch))
    return outputs


def score_cell(samples, predictions) -> dict:
    """One (task, length) cell: RULER's score (0-100) and every sample's prediction."""
    metric = METRICS[TASKS[samples[0].task].metric]
    scores = [metric(prediction, sample.answers) for sample, prediction in zip(samples, predictions)]
    return {"task": samples[0].task, "length": samples[0].length, "samples": len(samples),
            "metric": TASKS[samples[0].task].metric, "score": round(100 * sum(scores) / len(scores), 2),
            "prompt_tokens": [len(sample.input_ids) for sample in samples],
            "max_new_tokens": [sample.max_new_tokens for sample in samples],
            "predictions": [{"answers": sample.answers, "prediction": prediction, "score": score}
                            for sample, prediction, score in zip(samples, predictions, scores)]}


def run_cells(model, tokenizer, samples, batch_size: int = 4, bar=None, on_cell=None) -> list:
    """Score every (task, length) cell of `samples`; `on_cell(cell)` after each (to save progress); `bar` advances
    by each sample's `work`."""
    span = attention_span(model)
    cells = {}
    for sample in samples:
        cells.setdefault((sample.task, sample.length), []).append(sample)
    results = []
    for cell_samples in cells.values():
        start = time.perf_counter()
        cell = score_cell(cell_samples, generate(model, tokenizer, cell_samples, batch_size, bar, span))
        cell["seconds"] = round(time.perf_counter() - start, 2)
        results.append(cell)
        if on_cell is not None:
            on_cell(cell)
    return results


def average_by_length(cells: list, tasks: list) -> dict:
    """Mean score over `tasks` at each length where every one of them was run (RULER's summary); a length with a
    task missing (a cut-off run) has no mean."""
    by_length = {}
    for cell in cells:
        by_length.setdefault(cell["length"], {})[cell["task"]] = cell["score"]
    return {length: round(sum(scores.values()) / len(scores), 2) for length, scores in sorted(by_length.items())
            if set(scores) >= set(tasks)}


def effective_length(averages: dict, threshold: float):
    """The longest length such that it and every shorter evaluated length score at least `threshold` (stricter than
    RULER, which does not ask the shorter lengths); None when the shortest already falls below."""
    longest = None
    for length, score in sorted(averages.items()):
        if score < threshold:
            break
        longest = length
    return longest


def summarize(runs: list, tasks: list, pretrained_length: int) -> dict:
    """Per-length means and effective lengths of every run with RULER cells, against two thresholds: RULER's
    absolute 85.6, and 85% of a reference score read inside the pretrained length: the unextended model's ("none")
    mean at the shortest length, or without "none" each method's own. A reference read past the pretrained length
    (or equal to 0) would make the relative threshold meaningless, so there is then no relative effective length."""
    with_cells = [run for run in runs if run.get("ruler")]
    if not with_cells:
        return {}
    summary = {"absolute_threshold": ABSOLUTE_THRESHOLD, "relative_threshold": RELATIVE_THRESHOLD, "methods": {}}
    none = next((run for run in with_cells if run["method"] == "none"), None)
    if none is not None:
        averages = average_by_length(none["ruler"], tasks)
        if averages:
            shortest = min(averages)
            summary["reference"] = {"method": "none", "length": shortest, "score": averages[shortest]}
    for run in with_cells:
        averages = average_by_length(run["ruler"], tasks)
        if none is not None:
            reference = summary.get("reference")
        else:
            reference = {"method": run["method"], "length": min(averages), "score": averages[min(averages)]} \
                if averages else None
        usable = reference is not None and reference["length"] <= pretrained_length and reference["score"] > 0
        summary["methods"][run["method"]] = {
            "average": {str(n): score for n, score in averages.items()},
            "reference_score": reference["score"] if reference else None,
            "effective_length_relative": (effective_length(averages, RELATIVE_THRESHOLD * reference["score"])
                                          if usable else None),
            "relative_note": None if usable else (
                "no complete length yet" if reference is None else
                f"reference at {reference['length']} is past the pretrained length {pretrained_length}"
                if reference["length"] > pretrained_length else "reference score is 0"),
            "effective_length_absolute": effective_length(averages, ABSOLUTE_THRESHOLD)}
    return summary
