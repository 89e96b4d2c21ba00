"""`evaluate_model`: several extension methods on one model in one run; results.json, results.md and the plots.

The model is loaded once. Everything the unextended model computes (the sliding-window baseline and the "none"
run) is done first; then each method is applied with `extend_context`, which replaces the previous extension, so
no second copy of the weights is ever needed.
"""
from __future__ import annotations

import gc
import json
import math
import os
import tempfile
import time
from pathlib import Path

TASKS = ("ppl", "passkey", "ruler")
DTYPES = ("float32", "bfloat16", "float16")
OUTPUT_FILES = ("results.json", "results.md", "ppl_vs_length.png", "passkey_heatmap.png", "ruler_heatmap.png")
BASELINE = "unextended model, sliding window of its pretrained length, same scored tokens"


def parse_length(text) -> int:
    """'2k' -> 2048, '16K' -> 16384, '3000' -> 3000."""
    value = str(text).strip().lower()
    try:
        number = int(value[:-1]) * 1024 if value.endswith("k") else int(value)
    except ValueError:
        raise ValueError(f"a length is an int or '<int>k' (2k = 2048), got {text!r}") from None
    if number < 2:
        raise ValueError(f"a length must be at least 2 tokens, got {text!r}")
    return number


def default_factor(lengths, pretrained_length: int) -> float:
    """The smallest factor whose extended length covers the longest evaluated length."""
    longest = max(lengths)
    if longest <= pretrained_length:
        raise ValueError(f"no length exceeds the pretrained length {pretrained_length}, so there is no default "
                         "factor; give factor (--factor) explicitly")
    return longest / pretrained_length


def check_options(*, methods, lengths, tasks, depths, trials, factor, dtype, device_map, output, num_scored,
                  stride, text_file, ruler_tasks=None, samples=5, batch_size=1, chat_template=False,
                  haystack_file=None):
    """Validate every option before anything is loaded (pure; raises ValueError/TypeError naming the option)."""
    from ..methods import get_method

    if isinstance(methods, str) or not methods:
        raise TypeError(f"methods (--method) must be a non-empty list of names, got {methods!r}")
    for name in methods:
        if name != "none":
            try:
                module = get_method(name)
            except ValueError as err:  # it lists the known methods
                raise ValueError(f"methods (--method): {err}; or 'none' for the model as loaded") from None
            if module.KIND != "rope":
                raise ValueError(f"methods (--method): {name!r} is not a RoPE rescaling with a factor; to evaluate an "
                                 f"{name} model, extend and save it first, then evaluate that folder with 'none'")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods (--method) lists a method twice: {list(methods)}")
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in lengths):
        raise ValueError(f"lengths (--lengths) must be ints >= 2, got {lengths!r}")
    if not tasks or any(task not in TASKS for task in tasks):
        raise ValueError(f"tasks (--tasks) must be a non-empty subset of {TASKS}, got {tasks!r}")
    if any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0 for d in depths or [None]):
        raise ValueError(f"depths (--depths) must be numbers in [0, 1], got {depths!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials (--trials) must be an int >= 1, got {trials!r}")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                               or not factor > 1 or math.isinf(factor)):
        raise ValueError(f"factor (--factor) must be a number > 1, got {factor!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype (--dtype) must be one of {DTYPES}, got {dtype!r}")
    if device_map not in (None, "auto", "cpu"):
        raise ValueError(f"device_map (--device-map) must be 'auto', 'cpu' or None, got {device_map!r}")
    if num_scored is not None and not (isinstance(num_scored, int) and 1 <= num_scored < min(lengths)):
        raise ValueError(f"num_scored (--score-tokens) must be an int in [1, shortest length - 1 = "
                         f"{min(lengths) - 1}], got {num_scored!r}")
    if stride is not None and not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"stride (--stride) must be an int >= 1, got {stride!r}")
    if text_file is not None and not Path(text_file).is_file():
        raise ValueError(f"text (--text) must be an existing text file, got {text_file!r}")
    if "ruler" in tasks:
        import importlib.util

        from .ruler_tasks import check_task_names

        if importlib.util.find_spec("wonderwords") is None:
            raise ValueError("tasks (--tasks) 'ruler' draws its words from the package wonderwords, which is not "
                             "installed: pip install 'longctx-hf[eval]'")
        check_task_names(ruler_tasks)
        for name, value in (("samples (--samples)", samples), ("batch_size (--batch-size)", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(chat_template, bool):
            raise TypeError(f"chat_template (--chat-template) must be True or False, got {chat_template!r}")
        if haystack_file is not None and not Path(haystack_file).is_file():
            raise ValueError(f"haystack_file (--haystack) must be an existing text file, got {haystack_file!r}")
    if output is None:
        raise ValueError("output (--output) is required: the folder for results.json, results.md and the plots")
    existing = [name for name in OUTPUT_FILES if (Path(output) / name).exists()]
    if existing:
        raise ValueError(f"output (--output) {output} already holds {', '.join(existing)}; choose a new folder "
                         "(results are never overwritten)")


def _write_atomic(path: Path, text: str):
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(staging, path)


def _versions() -> dict:
    import torch
    import transformers

    from .. import __version__

    return {"longctx_hf": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def evaluate_model(model, methods=("none", "yarn"), *, factor=None, lengths=(2048, 4096, 8192, 16384),
                   tasks=("ppl", "passkey"), text=None, text_file=None, depths=(0.1, 0.5, 0.9), trials=3,
                   dtype="float32", device_map=None, output=None, num_scored=None, stride=None, passkey_lengths=None, seed=0,
                   progress=True, ruler_tasks=None, ruler_lengths=None, samples=5, chat_template=False,
                   batch_size=1, haystack_file=None) -> dict:
    """Compare `methods` ("none" = the model as loaded) on perplexity vs length, passkey retrieval and RULER.

    `model` is a folder, a Hub id or "smollm2". Perplexity: at every length, the last `num_scored` tokens
    (default: half the shortest length) of the same text (`text`, or the file `text_file`, default the Python
    standard library sources), with the full context; next to the baseline, the
    unextended model seeing at most its pretrained length (window chunks of `stride`, default a quarter window).
    Passkey: `passkey_lengths` (default `lengths`) x `depths`, `trials` keys per cell. RULER ("ruler" in `tasks`):
    `ruler_tasks` (default all) x `ruler_lengths` (default `lengths`), `samples` per cell, the same samples for
    every method; `chat_template` wraps each question in the model's chat template; rows of equal length are
    generated `batch_size` at a time; `haystack_file` replaces the default real-text haystack.
    `factor` default: the smallest that covers the longest length. Writes results.json, results.md and the PNGs
    into `output` (written again after every method, so a cut-off run keeps what it finished).
    """
    from .ruler_tasks import TASKS as RULER_TASKS

    lengths, depths, tasks, methods = sorted(set(lengths)), list(depths), list(tasks), list(methods)
    passkey_lengths = lengths if passkey_lengths is None else sorted(set(passkey_lengths))
    if "ruler" not in tasks:
        given = {"ruler_tasks": ruler_tasks, "ruler_lengths": ruler_lengths, "haystack_file": haystack_file,
                 "chat_template": chat_template or None, "samples": None if samples == 5 else samples,
                 "batch_size": None if batch_size == 1 else batch_size}
        ignored = [name for name, value in given.items() if value is not None]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} only apply to RULER: add 'ruler' to tasks (--tasks)")
        ruler_lengths = []
    else:
        ruler_lengths = lengths if ruler_lengths is None else sorted(set(ruler_lengths))
    ruler_tasks = list(RULER_TASKS) if ruler_tasks is None else ruler_tasks
    if not isinstance(ruler_tasks, str):
        ruler_tasks = list(dict.fromkeys(ruler_tasks))  # each task once, in the caller's order
    check_options(methods=methods, lengths=lengths + passkey_lengths + ruler_lengths, tasks=tasks, depths=depths,
                  trials=trials, factor=factor, dtype=dtype, device_map=device_map, output=output,
                  num_scored=num_scored, stride=stride, text_file=text_file, ruler_tasks=ruler_tasks, samples=samples,
                  batch_size=batch_size, chat_template=chat_template, haystack_file=haystack_file)
    if text is not None and text_file is not None:
        raise ValueError("give text or text_file (--text), not both")
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from ..hf_config import pretrained_rope
    from ..patch import extend_context, from_pretrained
    from ..real_model import resolve_model
    from .passkey import passkey_grid
    from .perplexity import default_text, default_text_name, nll_of_last, perplexity, sliding_window_nll

    path = resolve_model(model)
    window = pretrained_rope(AutoConfig.from_pretrained(path).to_dict()).max_position_embeddings
    extended = [m for m in methods if m != "none"]
    if extended and factor is None:
        factor = default_factor(lengths + passkey_lengths + ruler_lengths, window)
    num_scored = num_scored or min(lengths) // 2
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"model {model}: no tokenizer could be loaded from {path} ({err}); evaluation needs one")
    probe = "The special magic number is: 1234567."  # a folder without tokenizer files can still yield a stub
    decoded = tokenizer.decode(tokenizer(probe, add_special_tokens=False).input_ids)
    if "1234567" not in decoded:
        raise ValueError(f"model {model}: no usable tokenizer in {path}: {type(tokenizer).__name__} turns {probe!r} "
                         f"into {decoded!r}; evaluation needs the model's own tokenizer files")
    ruler_samples = None
    if "ruler" in tasks:  # built before the model is loaded: a length too short for a task fails here
        from .ruler_tasks import build_samples

        if chat_template and not tokenizer.chat_template:
            raise ValueError(f"chat_template (--chat-template): the tokenizer of {model} has no chat template")
        ruler_samples, resources = build_samples(tokenizer, ruler_tasks, ruler_lengths, samples, seed,
                                                 chat_template, haystack_file, progress=progress)
    ids = None
    if "ppl" in tasks:
        if text_file is not None:
            text, text_name = Path(text_file).read_text(encoding="utf-8", errors="replace"), str(text_file)
        elif text is not None:
            text_name = "text given by the caller"
        else:
            text, text_name = default_text(min_chars=8 * max(lengths)), default_text_name()
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        if len(ids) < max(lengths):
            raise ValueError(f"text (--text) has {len(ids)} tokens, fewer than the longest length {max(lengths)}")
        ids = ids[-max(lengths):]  # every length ends on the same tokens
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)

    def load():
        return from_pretrained(path, dtype=getattr(torch, dtype), device_map=device_map).eval()

    state = {"model": load(), "method": "none"}

    def use(method):
        """Put the one loaded model into `method`'s state: re-extension replaces; "none" after an extension
        reloads (the old weights are dropped first, so there is never a second copy)."""
        if method == state["method"]:
            return state["model"]
        if method == "none":
            state["model"] = None
            gc.collect()
            state["model"] = load()
        else:
            extend_context(state["model"], method, factor=factor)
        state["method"] = method
        return state["model"]

    def unextended_first():
        """The caller's order, "none" first while nothing is extended yet (so it needs no reload)."""
        return sorted(methods, key=lambda m: m != "none") if state["method"] == "none" else methods

    results = {"model": str(model), "model_path": path, "pretrained_length": window,
               "runs": [{"method": m, "factor": None if m == "none" else float(factor), "options": {}}
                        for m in methods],
               "baseline": BASELINE, "text": text_name if ids is not None else None,
               "lengths": lengths, "passkey_lengths": passkey_lengths, "depths": depths, "trials": trials,
               "tokens_scored": num_scored, "baseline_stride": stride or max(window // 4, 1), "dtype": dtype,
               "device_map": device_map, "seed": seed, "versions": _versions(), "plots": {}, "complete": False}
    if ruler_samples is not None:
        import platform
        from importlib.metadata import version

        from .ruler_tasks import ANSWER_MARGIN

        results["ruler"] = {"tasks": list(dict.fromkeys(s.task for s in ruler_samples)), "lengths": ruler_lengths,
                            "samples": samples, "chat_template": chat_template, "haystack": resources.haystack_source,
                            "haystack_sha256": resources.haystack_sha256, "python": platform.python_version(),
                            "words": resources.words_source, "answer_margin": ANSWER_MARGIN,
                            "batch_size": batch_size}
        results["versions"]["wonderwords"] = version("wonderwords")
    runs = {run["method"]: run for run in results["runs"]}

    def save():
        _write_atomic(output / "results.json", json.dumps(results, indent=2) + "\n")

    # Perplexity of every method first (cheaper than passkey, so a cut-off run still has the whole ppl table),
    # the unextended model's work (baseline, "none") before any extension.
    if ids is not None:
        baseline = {}
        for length in tqdm(lengths, desc="baseline", disable=not progress):
            start = time.perf_counter()
            nll = sliding_window_nll(use("none"), ids[-length:], num_scored, window, stride, progress=progress)
            baseline[length] = (perplexity(nll, num_scored), time.perf_counter() - start)
        results["baseline_perplexity"] = [{"length": n, "ppl": p, "seconds": s} for n, (p, s) in baseline.items()]
        save()
        for method in (["none"] if "none" in methods else []) + extended:
            run = runs[method]
            run["perplexity"] = []
            for length in tqdm(lengths, desc=f"{method} perplexity", disable=not progress):
                start = time.perf_counter()
                if method == "none" and length <= window:  # identical computation to the baseline's
                    ppl = baseline[length][0]
                else:
                    ppl = perplexity(nll_of_last(use(method), ids[-length:], num_scored), num_scored)
                run["perplexity"].append({"length": length, "ppl": ppl, "baseline_ppl": baseline[length][0],
                                          "tokens_scored": num_scored, "seconds": time.perf_counter() - start})
                save()
    if "passkey" in tasks:
        order = unextended_first()
        for method in order:
            runs[method]["passkey"] = passkey_grid(use(method), tokenizer, passkey_lengths, depths, trials, seed,
                                                   progress=progress)
            save()
    if ruler_samples is not None:
        from .ruler import attention_span, run_cells, work

        order = unextended_first()
        span = attention_span(use(order[0]))  # every method runs the same weights
        bar = tqdm(total=len(order) * sum(work(s, span) for s in ruler_samples), desc="RULER", unit="work",
                   unit_scale=True, disable=not progress,
                   bar_format="{l_bar}{bar}| [{elapsed}<{remaining}{postfix}]")
        for method in order:
            run = runs[method]
            run["ruler"] = []

            def save_cell(cell, run=run, method=method):
                run["ruler"].append(cell)
                results["ruler_summary"] = ruler_summary(results)
                bar.set_postfix_str(f"{method} {cell['task']}@{cell['length']}: {cell['score']:.0f}")
                save()

            run_cells(use(method), tokenizer, ruler_samples, batch_size, bar=bar, on_cell=save_cell)
        bar.close()
    results["complete"] = True
    write_reports(results, output)
    return results


def write_reports(results: dict, output) -> str:
    """results.md, the plots and the final results.json from a results dict; returns the markdown."""
    from .plots import passkey_heatmap, ppl_vs_length, ruler_heatmap

    output = Path(output)
    if any(run.get("perplexity") for run in results["runs"]):
        ppl_vs_length(results, output / "ppl_vs_length.png")
        results["plots"]["ppl_vs_length"] = "ppl_vs_length.png"
    if any(run.get("passkey") for run in results["runs"]):
        passkey_heatmap(results, output / "passkey_heatmap.png")
        results["plots"]["passkey_heatmap"] = "passkey_heatmap.png"
    if any(run.get("ruler") for run in results["runs"]):
        results["ruler_summary"] = ruler_summary(results)
        ruler_heatmap(results, output / "ruler_heatmap.png")
        results["plots"]["ruler_heatmap"] = "ruler_heatmap.png"
    table = markdown_table(results)
    _write_atomic(output / "results.md", table)
    _write_atomic(output / "results.json", json.dumps(results, indent=2) + "\n")
    return table


def _method_label(run) -> str:
    return "none (unextended)" if run["method"] == "none" else f"{run['method']} x{run['factor']:g}"


def markdown_table(results: dict) -> str:
    """Perplexity per length (with the baseline) and passkey accuracy per length, one row per method."""
    lines = []
    with_ppl = [run for run in results["runs"] if run.get("perplexity")]
    if with_ppl:
        lengths = results["lengths"]
        window = results["pretrained_length"]
        lines += [f"Perplexity of the same last {results['tokens_scored']} tokens, by context length "
                  f"({results['model']}, pretrained length {window}):", "",
                  "| method | " + " | ".join(str(n) for n in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        baseline = {row["length"]: row["ppl"] for row in results["baseline_perplexity"]}
        lines.append(f"| baseline: unextended, {window}-token window | "
                     + " | ".join(f"{baseline[n]:.2f}" for n in lengths) + " |")
        for run in with_ppl:
            measured = {row["length"]: f"{row['ppl']:.2f}" for row in run["perplexity"]}
            lines.append(f"| {_method_label(run)} | " + " | ".join(measured.get(n, "not run") for n in lengths)
                         + " |")
        lines.append("")
    with_passkey = [run for run in results["runs"] if run.get("passkey")]
    if with_passkey:
        lengths = sorted({cell["length"] for run in with_passkey for cell in run["passkey"]})
        lines += [f"Passkey retrieval, correct / trials over depths {results['depths']}:", "",
                  "| method | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for run in with_passkey:
            cells = []
            for length in lengths:
                row = [c for c in run["passkey"] if c["length"] == length]
                correct, trials = sum(c["correct"] for c in row), sum(c["trials"] for c in row)
                cells.append(f"{correct}/{trials} ({100 * correct / trials:.0f}%)" if trials else "not run")
            lines.append(f"| {_method_label(run)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _ruler_tables(results)
    return "\n".join(lines)


def ruler_summary(results: dict) -> dict:
    from .ruler import summarize

    return summarize(results["runs"], results["ruler"]["tasks"], results["pretrained_length"])


def _ruler_tables(results: dict) -> list:
    """RULER's summary (mean over tasks per length, effective lengths), then every task's score."""
    with_ruler = [run for run in results["runs"] if run.get("ruler")]
    if not with_ruler:
        return []
    summary = ruler_summary(results)
    lengths = sorted({cell["length"] for run in with_ruler for cell in run["ruler"]})
    reference = summary.get("reference")
    relative = f"{summary['relative_threshold']:.0%} of " + (
        f"the unextended model's {reference['score']:.1f} at {reference['length']}" if reference
        else "the method's own score at its shortest length")
    lines = [f"RULER, mean score over tasks (0-100), {results['ruler']['samples']} samples per task and length; "
             f"effective length: the longest length up to which every length scores at least {relative}, "
             f"or RULER's absolute {summary['absolute_threshold']}:", "",
             "| method | " + " | ".join(str(n) for n in lengths) + " | effective (relative) | effective (absolute) |",
             "|---|" + "---|" * (len(lengths) + 2)]
    for run in with_ruler:
        methods = summary["methods"][run["method"]]
        averages = methods["average"]
        lines.append(f"| {_method_label(run)} | " + " | ".join(f"{averages[str(n)]:.1f}" if str(n) in averages
                                                                   else "incomplete" for n in lengths)
                     + " | " + (f"n/a ({methods['relative_note']})" if methods["relative_note"]
                                else str(methods["effective_length_relative"] or f"< {lengths[0]}"))
                     + f" | {methods['effective_length_absolute'] or '< ' + str(lengths[0])} |")
    columns = [(run, n) for run in with_ruler for n in lengths]
    lines += ["", "RULER score per task:", "",
              "| task | " + " | ".join(f"{_method_label(run)} @ {n}" for run, n in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for task in results["ruler"]["tasks"]:
        scores = []
        for run, n in columns:
            cell = next((c for c in run["ruler"] if c["task"] == task and c["length"] == n), None)
            scores.append(f"{cell['score']:.0f}" if cell else "not run")
        lines.append(f"| {task} | " + " | ".join(scores) + " |")
    lines.append("")
    return lines
