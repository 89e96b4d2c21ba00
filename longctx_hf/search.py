"""LongRoPE's search (Ding et al. 2024, arXiv 2402.13753 §3): per-frequency rescale factors found on the model.

Genome: one factor λ_i >= 1 per rotary frequency, non-decreasing from high to low frequency, plus the attention
temperature as one more gene. Seeds: YaRN (its ramp as factors, its 0.1 ln s + 1 temperature: the search starts
from YaRN exactly), PI, NTK, and LongRoPE's default temperature. Each generation keeps the best candidates so far
as parents and makes children by crossover and mutation (log-normal steps, then the monotonicity repaired).
Fitness: perplexity of calibration tokens at the target length, one forward each, no full-vocabulary logits;
either every token of the window or only its last `scored_tokens` (e.g. those past the pretrained length, which
see more context than the model was trained with: the part an extension exists for).

Reproducible and resumable: candidate k is a function of the seed and the fitnesses before it only, every
evaluation is appended to results.json at once, and a restarted search replays the recorded fitnesses instead of
recomputing them, so it continues exactly where it was cut off.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import methods

CALIBRATION_TEXT_NAME = "Python standard library package sources (*/*.py, sorted by path)"
RESULTS_FILE = "results.json"
FACTORS_FILE = "factors.json"
PLOT_FILE = "search.png"
TEMPERATURE_RANGE = (0.8, 1.6)  # the attention factor gene stays within it
FITNESSES = ("perplexity", "needle")  # needle: LongRoPE2's needle-driven perplexity (needle_fitness.py)


@dataclass(frozen=True)
class Candidate:
    factors: tuple
    attention_factor: float
    origin: str

    def key(self) -> tuple:
        return tuple(round(f, 6) for f in self.factors) + (round(self.attention_factor, 6),)


def _repair(factors, maximum) -> tuple:
    """Clip to [1, maximum] and make non-decreasing (low frequencies are stretched at least as much)."""
    out, floor = [], 1.0
    for value in factors:
        floor = min(max(floor, value, 1.0), maximum)
        out.append(floor)
    return tuple(out)


def seed_candidates(spec) -> list:
    """YaRN, YaRN's factors with LongRoPE's temperature, PI and NTK, as genomes (spec: a longrope Spec)."""
    yarn_factors = methods.longrope.yarn_seed(spec)
    yarn_temperature = methods.yarn.attention_scaling(methods.yarn.Spec(
        factor=spec.factor, rope_theta=spec.rope_theta, rotary_dim=spec.rotary_dim,
        original_max_position_embeddings=spec.original_max_position_embeddings))
    count, s = spec.rotary_dim // 2, spec.factor
    ntk = tuple(s ** (2 * i / (spec.rotary_dim - 2)) for i in range(count))
    return [Candidate(yarn_factors, yarn_temperature, "yarn"),
            Candidate(yarn_factors, methods.longrope.attention_scaling(spec), "yarn factors, longrope temperature"),
            Candidate((s,) * count, 1.0, "pi"),
            Candidate(ntk, 1.0, "ntk")]


def _mutate(candidate, rng, maximum, sigma, origin) -> Candidate:
    factors = [f * math.exp(rng.gauss(0.0, sigma)) if rng.random() < 0.3 else f for f in candidate.factors]
    temperature = candidate.attention_factor
    if rng.random() < 0.5:
        temperature = min(max(temperature + rng.gauss(0.0, 0.03), TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])
    return Candidate(_repair(factors, maximum), temperature, origin)


def _crossover(a, b, rng) -> Candidate:
    factors = [x if rng.random() < 0.5 else y for x, y in zip(a.factors, b.factors)]
    return Candidate(tuple(factors), a.attention_factor if rng.random() < 0.5 else b.attention_factor, "crossover")


def _children(parents, generation, size, seed, maximum, sigma) -> list:
    """`size` candidates of one generation; a function of the seed, the generation and the parents only."""
    out = []
    for index in range(size):
        rng = random.Random(f"{seed}:{generation}:{index}")
        first = rng.choice(parents)
        if len(parents) > 1 and rng.random() < 0.5:
            second = rng.choice([p for p in parents if p is not first])
            first = _crossover(first, second, rng)
        out.append(_mutate(first, rng, maximum, sigma, f"generation {generation}"))
    return out


@dataclass
class SearchResult:
    best: dict  # {"long_factor", "attention_factor", "ppl", "origin", "index"}
    evaluations: int
    output_dir: Path
    results: dict


def calibration_text(min_chars: int = 400_000) -> str:
    """The default calibration text: the standard library's package sources, a different text from the top-level
    modules that evaluation reads by default (evaluate.perplexity.default_text)."""
    import sysconfig

    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*/*.py")):
        if path.parent.name in ("test", "tests", "idlelib", "site-packages"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= min_chars:
            break
    return "\n\n".join(parts)


def _extend_quietly(model, factor, original_max_position_embeddings, **options):
    """extend_context without its EngineWarning: candidates are never saved; the chosen factors warn when written."""
    import warnings

    from .engines import EngineWarning
    from .patch import extend_context

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EngineWarning)
        extend_context(model, "longrope", factor, original_max_position_embeddings=original_max_position_embeddings,
                       **options)


def run_search(model, *, factor, output_dir, text_file=None, budget=None, minutes=None, seed=0, population=8,
               documents=1, scored_tokens=None, fitness="perplexity", checkpoint=False, dtype="float32",
               progress=True) -> SearchResult:
    """`longctx-hf search`: load `model` (a folder, a Hub id or "smollm2"), search on the calibration text, write
    the results and, with `checkpoint=True`, `output_dir`/checkpoint extended with the best factors."""
    check_search_options(factor=factor, budget=budget, minutes=minutes, population=population, parents=1,
                         documents=documents, scored_tokens=scored_tokens, fitness=fitness)
    if text_file is not None and not Path(text_file).is_file():
        raise ValueError(f"--text must be a text file; not found: {text_file}")
    import torch
    from transformers import AutoTokenizer

    from .evaluate.perplexity import default_text, default_text_name
    from .patch import from_pretrained
    from .real_model import resolve_model

    path = resolve_model(model)
    if text_file is not None:
        text, text_name = Path(text_file).read_text(encoding="utf-8", errors="replace"), str(text_file)
    else:
        text, text_name = calibration_text(), CALIBRATION_TEXT_NAME
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = tokenizer(text, return_offsets_mapping=tokenizer.is_fast)
    ids = torch.tensor(encoded.input_ids)
    if text_file is not None:  # the search scores the text's last windows only: those must not be evaluation text
        from transformers import AutoConfig

        from .patch import context_info

        scored = documents * math.ceil(context_info(AutoConfig.from_pretrained(path)).pretrained_length * factor)
        start = (encoded.offset_mapping[-min(scored, len(ids))][0] if tokenizer.is_fast
                 else max(0, len(text) - len(text) * scored // max(len(ids), 1)))
        check_not_the_evaluation_text(text[start:], default_text(min_chars=10**9), default_text_name())
    loaded = from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    result = search_rope_factors(loaded, ids, factor=factor, output_dir=output_dir, budget=budget, minutes=minutes,
                                 seed=seed, population=population, documents=documents,
                                 scored_tokens=scored_tokens, fitness=fitness,
                                 encode=lambda t: tokenizer(t, add_special_tokens=False).input_ids,
                                 progress=progress, calibration_text=text_name, evaluation_text=default_text_name())
    if checkpoint:
        from .checkpoint import extend_checkpoint

        best, setup = result.best, result.results["setup"]
        note = (f"## How the factors were found\n\n`longctx-hf search` (LongRoPE's evolutionary search, seeded with "
                f"YaRN, PI and NTK) evaluated {result.evaluations} candidates by {fitness_description(setup)} on "
                f"{setup['calibration_text']} (seed {setup['seed']}). Best: perplexity {best['ppl']:.4f}, "
                f"YaRN {result.results['yarn_ppl']:.4f} on the same tokens. Held-out evaluation should use another "
                f"text (by default `longctx-hf eval` uses {setup['evaluation_text']}).")
        extend_checkpoint(path, Path(output_dir) / "checkpoint", "longrope", factor, long_factor=best["long_factor"],
                          attention_factor=best["attention_factor"], overwrite=True, card_note=note)
    return result


def check_not_the_evaluation_text(text: str, evaluation: str, evaluation_name: str, probes=32, width=256) -> None:
    """A ValueError when a quarter or more of `probes` evenly spaced `width`-character slices of the calibration
    text (the part the search scores) occur verbatim in the evaluation text: factors searched on the tokens they are then scored on would
    overstate their quality. (The default calibration text shares none of 32 with the default evaluation text.)"""
    step = max(1, (len(text) - width) // probes)
    slices = [text[i * step:i * step + width] for i in range(probes)]
    found = sum(len(piece) == width and piece in evaluation for piece in slices)
    if found * 4 >= probes:
        raise ValueError(f"--text overlaps the evaluation text ({found} of {probes} sampled passages of "
                         f"{width} characters occur in {evaluation_name}, which `longctx-hf eval` scores): "
                         "calibrate on another text")


def check_search_options(*, factor, budget, minutes, population, parents, documents, scored_tokens=None,
                         fitness="perplexity") -> None:
    """A ValueError naming the first bad search option, before any model is loaded."""
    if fitness not in FITNESSES:
        raise ValueError(f"fitness must be one of {FITNESSES}, got {fitness!r}")
    if fitness == "needle" and scored_tokens is not None:
        raise ValueError("scored_tokens applies to fitness 'perplexity'; the needle fitness scores the answers")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"factor must be a number > 1, got {factor!r}")
    if budget is None and minutes is None:
        raise ValueError("give budget=<evaluations> (--budget) or minutes=<wall-clock limit> (--minutes), or both")
    for name, value, lowest in (("budget", budget, 1), ("population", population, 2), ("parents", parents, 1),
                                ("documents", documents, 1), ("scored_tokens", scored_tokens, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < lowest):
            raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes > 0):
        raise ValueError(f"minutes must be a positive number, got {minutes!r}")


def search_rope_factors(model, calibration_ids, *, factor, output_dir, budget=None, minutes=None, seed=0,
                        population=8, parents=4, sigma=0.15, documents=1, scored_tokens=None,
                        fitness="perplexity", encode=None, original_max_position_embeddings=None,
                        calibration_text="", evaluation_text="", progress=True) -> SearchResult:
    """Search LongRoPE factors for `model` at `factor` x its pretrained length, on `calibration_ids` (a 1-D token
    tensor); fitness is the perplexity of its last `documents` windows of the target length, each scored whole or,
    with `scored_tokens`, only the last that many tokens of each window (each with the whole window as context).
    `fitness="needle"`: LongRoPE2's needle-driven perplexity instead (needle_fitness.py; `encode(text) -> ids` is
    the model's tokenizer without special tokens).

    Stops after `budget` evaluations or `minutes` (whichever comes first; one of them is required). Writes
    `output_dir`/results.json after every evaluation, and factors.json (for `extend --factors`) plus a plot at the
    end. Leaves `model` extended with the best factors. Resumes from an existing results.json with the same setup.
    """
    import torch

    from .evaluate.perplexity import nll_at, nll_of_last
    from .patch import context_info

    check_search_options(factor=factor, budget=budget, minutes=minutes, population=population, parents=parents,
                         documents=documents, scored_tokens=scored_tokens, fitness=fitness)
    if fitness == "needle" and encode is None:
        raise ValueError("fitness 'needle' needs encode= (text -> token ids, the model's tokenizer)")
    if calibration_text and calibration_text == evaluation_text:
        raise ValueError("the calibration text must differ from the evaluation text: factors searched on the text "
                         "they are evaluated on would overstate their quality")
    unextended = context_info(model)
    pretrained = original_max_position_embeddings or unextended.pretrained_length
    spec = _spec_of(model, factor, unextended.pretrained_rope_theta, pretrained)
    length = spec.extended_length
    if calibration_ids.ndim != 1 or len(calibration_ids) < documents * length:
        raise ValueError(f"calibration text has {len(calibration_ids)} tokens; the search scores {documents} x "
                         f"{length} (the target length {pretrained} x {factor:g}): give a longer text")
    scored_count = length - 1 if scored_tokens is None else scored_tokens
    if scored_count >= length:
        raise ValueError(f"scored_tokens must be below the target length {length} (each scored token needs one "
                         f"before it), got {scored_tokens}")
    samples = None
    if fitness == "needle":
        from .needle_fitness import needle_samples

        samples = needle_samples(encode, calibration_ids, length, documents, seed)
    _extend_quietly(model, factor, original_max_position_embeddings)
    windows = calibration_ids[len(calibration_ids) - documents * length:].reshape(documents, length)
    setup = {"factor": float(factor), "pretrained_length": pretrained, "target_length": length,
             "rope_theta": spec.rope_theta, "rotary_dim": spec.rotary_dim, "seed": seed, "population": population,
             "parents": parents, "sigma": sigma, "documents": documents, "fitness": fitness,
             "scored_tokens": scored_count if fitness == "perplexity" else None,
             "calibration_text": calibration_text, "evaluation_text": evaluation_text,
             "model_fingerprint": weights_fingerprint(model), "calibration_tokens_sha256": tokens_sha256(calibration_ids)}
    if samples is not None:  # (key, value, depth) of every needle, per window
        setup["needles"] = [[list(needle) for needle in sample.needles] for sample in samples]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = _load_or_start(output_dir / RESULTS_FILE, setup)
    recorded = results["candidates"]
    maximum = 4.0 * float(factor)
    started, evaluated_now = time.perf_counter() - results.get("seconds", 0.0), 0
    bar = _progress(budget, progress)

    def fitness(candidate: Candidate) -> float:
        nonlocal evaluated_now
        index = len(results["candidates_seen"])
        results["candidates_seen"].append(candidate.key())
        if index < len(recorded):  # replay: the same candidate, its recorded fitness
            if tuple(recorded[index]["key"]) != candidate.key():
                raise ValueError(f"{output_dir / RESULTS_FILE} was written by a different search (candidate "
                                 f"{index} differs); use another output folder")
            bar.update(1)  # evaluation k of N counts the replayed ones too
            return recorded[index]["ppl"]
        _extend_quietly(model, factor, original_max_position_embeddings, long_factor=list(candidate.factors),
                        attention_factor=candidate.attention_factor)
        if samples is None:
            nll = sum(nll_of_last(model, window, scored_count) for window in windows)
            ppl = math.exp(nll / (documents * scored_count))
        else:
            nll = sum(nll_at(model, torch.tensor(s.input_ids), s.scored) for s in samples)
            ppl = math.exp(nll / sum(len(s.scored) for s in samples))
        recorded.append({"index": index, "origin": candidate.origin, "ppl": ppl, "key": list(candidate.key()),
                         "long_factor": list(candidate.factors), "attention_factor": candidate.attention_factor})
        evaluated_now += 1
        results["seconds"] = time.perf_counter() - started
        _write_json(output_dir / RESULTS_FILE, {k: v for k, v in results.items() if k != "candidates_seen"})
        best = min(r["ppl"] for r in recorded)
        bar.update(1)
        bar.set_postfix_str(f"best ppl {best:.4f}")
        return ppl

    def out_of_budget() -> bool:
        count = len(results["candidates_seen"])
        if budget is not None and count >= budget:
            return True
        return minutes is not None and count >= len(recorded) and time.perf_counter() - started > 60 * minutes

    results["candidates_seen"] = []
    scored = []  # (ppl, order, candidate)
    generation, pending = 0, seed_candidates(spec)
    seen = {}
    while not out_of_budget():
        for candidate in pending:
            if out_of_budget():
                break
            if candidate.key() in seen:
                continue
            seen[candidate.key()] = fitness(candidate)
            scored.append((seen[candidate.key()], len(scored), candidate))
        generation += 1
        best_parents = [c for _, _, c in sorted(scored, key=lambda item: item[:2])[:parents]]
        pending = _children(best_parents, generation, population, seed, maximum, sigma)
    bar.close()
    del results["candidates_seen"]
    best_index = min(range(len(recorded)), key=lambda i: (recorded[i]["ppl"], i))
    best = {k: recorded[best_index][k] for k in ("index", "origin", "ppl", "long_factor", "attention_factor")}
    yarn = next(r for r in recorded if r["origin"] == "yarn")
    results.update(best=best, yarn_ppl=yarn["ppl"], evaluations=len(recorded),
                   seconds=time.perf_counter() - started)
    _write_json(output_dir / RESULTS_FILE, results)
    _write_json(output_dir / FACTORS_FILE, {"long_factor": best["long_factor"],
                                            "attention_factor": best["attention_factor"]})
    _extend_quietly(model, factor, original_max_position_embeddings, long_factor=best["long_factor"],
                    attention_factor=best["attention_factor"])
    _plot(results, output_dir / PLOT_FILE)
    return SearchResult(best=best, evaluations=len(recorded), output_dir=output_dir, results=results)


def _spec_of(model, factor, rope_theta, pretrained_length):
    from .patch import _rotary_dim, _rotary_modules

    rotaries, _ = _rotary_modules(model)
    return methods.longrope.Spec(factor=float(factor), rope_theta=rope_theta, rotary_dim=_rotary_dim(rotaries[0]),
                                 original_max_position_embeddings=pretrained_length)


# setup keys added after the first release, with the value an older results.json implicitly had
SETUP_DEFAULTS = {"fitness": lambda setup: "perplexity", "scored_tokens": lambda setup: setup["target_length"] - 1}
IDENTITY_KEYS = ("model_fingerprint", "calibration_tokens_sha256")  # what a replayed fitness was measured on


def weights_fingerprint(model) -> str:
    """sha256 over every parameter's name, shape, dtype and its first and last 256 values: a resumed search must
    replay fitnesses measured on these weights, not on another model of the same shape (hashing every value of a
    large model would cost seconds per resume for no practical gain)."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        flat = parameter.detach().reshape(-1)
        values = flat[:256].tolist() + flat[-256:].tolist()
        digest.update(f"{name}{tuple(parameter.shape)}{parameter.dtype}{values}".encode())
    return digest.hexdigest()


def tokens_sha256(ids) -> str:
    return hashlib.sha256(str(ids.tolist()).encode()).hexdigest()


def _load_or_start(path: Path, setup: dict) -> dict:
    if path.is_file():
        results = json.loads(path.read_text())
        recorded = results.get("setup") or {}
        for key, default in SETUP_DEFAULTS.items():
            if key not in recorded and "target_length" in recorded:
                recorded[key] = default(recorded)
        unchecked = [key for key in IDENTITY_KEYS if key not in recorded and "target_length" in recorded]
        if unchecked:  # written before the search recorded them: resumable, but say what cannot be checked
            warnings.warn(f"{path} records no {' or '.join(unchecked)}; resuming trusts that the model and the "
                          "calibration tokens are the ones it was started with", stacklevel=3)
            recorded.update({key: setup[key] for key in unchecked})
            results["setup"] = recorded
        if recorded != setup:
            changed = sorted(key for key in set(recorded) | set(setup) if recorded.get(key) != setup.get(key))
            raise ValueError(f"{path} holds a search with another setup (differs in: {', '.join(changed)}); give a "
                             "new output folder, or the same model, text, factor, seed and search options to resume it")
        return results
    return {"setup": setup, "candidates": [], "seconds": 0.0}


def _write_json(path: Path, data: dict) -> None:
    """Atomic: a search cut off mid-write keeps the previous complete file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(temporary, path)


def _progress(budget, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=budget, desc="search: evaluations", disable=not enabled, unit="eval")


def fitness_description(setup: dict) -> str:
    """What a search's fitness measured, in words (model card, plot)."""
    length = setup["target_length"]
    if setup.get("fitness", "perplexity") == "needle":
        return f"needle-driven perplexity at {length} tokens"
    if setup.get("scored_tokens", length - 1) < length - 1:
        return f"perplexity of the last {setup['scored_tokens']} of {length} tokens"
    return f"perplexity of windows of {length} tokens"


def _plot(results: dict, path: Path) -> None:
    """Perplexity of every candidate and the best so far, against evaluations (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ppl = [r["ppl"] for r in results["candidates"]]
    best = [min(ppl[: i + 1]) for i in range(len(ppl))]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.scatter(range(1, len(ppl) + 1), ppl, s=10, alpha=0.5, label="candidate")
    axes.plot(range(1, len(ppl) + 1), best, color="black", label="best so far")
    axes.axhline(results["yarn_ppl"], color="tab:red", linestyle="--", label="YaRN (first seed)")
    axes.set(xlabel="evaluation", ylabel=fitness_description(results["setup"]),
             yscale="log", title=f"LongRoPE search, x{results['setup']['factor']:g}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


