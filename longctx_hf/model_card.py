"""The model card (README.md) of an extended checkpoint: YAML front matter the Hub reads, and a body that says what
was changed, how to load it, what to fine-tune, and what was measured.

Written with PyYAML alone (huggingface_hub's ModelCard costs ~0.4 s of imports; the offline `extend` takes 0.2-0.3 s in all).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from . import hf_config
from .engines import MEASURED_WITH
from .repo_id import looks_like_repo_id

PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")
CONFIG_KEYS = ("max_position_embeddings", "rope_parameters", "rope_theta", "rope_scaling", "auto_map",
               hf_config.RECORD_KEY)

FINE_TUNING = {
    "pi": "Fine-tune before use: Position Interpolation needs about 1000 steps at the target length (Chen et al. "
          "2023); zero-shot it blurs nearby positions.",
    "ntk": "Usable zero-shot. A short fine-tune at the target length helps but is optional.",
    "dynamic_ntk": "Meant for zero-shot use: the base grows with the current length, so a fine-tune at one fixed "
                   "length does not match it. Cached decoding past the pretrained length is not equal to a "
                   "recompute in transformers (keys are cached after rotation, transformers #25104).",
    "self_extend": "Training-free by design (Jin et al. 2024): no fine-tuning. Its attention runs in the shipped "
                   "modeling code; inference engines that do not implement SelfExtend cannot serve this checkpoint.",
    "yarn": "Best zero-shot of the RoPE methods; about 400 fine-tuning steps at the target length reach it (Peng et "
            "al. 2023). Keep the same YaRN config while fine-tuning.",
}


def repo_id_in(config: dict) -> str | None:
    """The Hub id a config says it came from (`_name_or_path`), when that is a repo id and not a local path."""
    name = config.get("_name_or_path")
    return name if isinstance(name, str) and looks_like_repo_id(name) else None


FRONT_MATTER = re.compile(r"^---\s*\n(.*?)\n---\s*(\n|$)", re.DOTALL)
BASE_CARD_HEADING = "## Base model card"


def front_matter(card_file: Path) -> dict:
    """The YAML metadata of an existing model card, or {} when there is none."""
    if not card_file.is_file():
        return {}
    match = FRONT_MATTER.match(card_file.read_text(encoding="utf-8", errors="replace"))
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_card_body(card_file: Path, metadata: dict) -> str:
    """The source card's text without its front matter (its intended use, limits, citation...). When the source is
    itself a longctx-hf output (re-extension), only the base card it carried, so cards never nest."""
    if not card_file.is_file():
        return ""
    text = card_file.read_text(encoding="utf-8", errors="replace")
    match = FRONT_MATTER.match(text)
    body = text[match.end():] if match else text
    if "longctx-hf" in (metadata.get("tags") or []):
        _, found, body = body.partition(BASE_CARD_HEADING + "\n")
        body = body if found else ""
    return body.strip()


def load_eval_results(path) -> tuple[dict, dict]:
    """(results, {plot file name: path}) from a results.json (docs/results_schema.md), checked before anything is written."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"eval_results must be a results.json file; not found: {path}")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"eval_results {path} is not valid JSON: {err}") from err
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        raise ValueError(f"eval_results {path} has no 'runs' list (see docs/results_schema.md)")
    plots = {}
    for name in (results.get("plots") or {}).values():
        plot = path.parent / str(name)
        if plot.suffix.lower() not in PLOT_SUFFIXES:  # never config.json, a weight or a tokenizer file
            raise ValueError(f"eval_results plots must be images ({', '.join(PLOT_SUFFIXES)}), got {name!r}")
        if not plot.is_file():
            raise ValueError(f"eval_results names a plot that does not exist: {plot}")
        if plot.name in plots:  # every plot is written under its file name into the checkpoint's top folder
            raise ValueError(f"eval_results names two plots called {plot.name!r}; give them different file names")
        plots[plot.name] = plot
    return results, plots


def render(config: dict, *, base_model=None, source_card=None, eval_results=None, plots=None,
           remote_code=False, name, note=None) -> str:
    """The full README.md text for an extended checkpoint whose (new) config dict is `config`."""
    info = hf_config.describe(config)
    source = front_matter(Path(source_card)) if source_card else {}
    base_model = base_model or source.get("base_model")  # the source's own lineage, when its id is unknown
    metadata = {"library_name": "transformers"}
    if base_model:
        metadata["base_model"] = base_model
    if source.get("license"):
        metadata["license"] = source["license"]
        for key in ("license_name", "license_link"):  # license: other needs both on the Hub
            if source.get(key):
                metadata[key] = source[key]
    metadata["tags"] = ["longctx-hf", info.method, "long-context"]
    body = [_summary(info, base_model), _config_snippet(config), _how_to_load(name, remote_code), *_engines(info),
            "## Fine-tuning\n\n" + FINE_TUNING.get(info.method, "See the longctx-hf README for this method.")]
    if note:
        body.append(note.strip())
    if eval_results:
        body.append(_evaluation(eval_results, plots or {}))
    base_card = base_card_body(Path(source_card), source) if source_card else ""
    if base_card:
        body.append(f"{BASE_CARD_HEADING}\n\n{base_card}")
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n\n" + "\n\n".join(body) + "\n"


def _summary(info, base_model) -> str:
    base_model = base_model if isinstance(base_model, str) else None  # a card's base_model may be a list
    options = ", ".join(f"{k}={v}" for k, v in info.options.items()) or "defaults"
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "The source checkpoint"
    lines = [
        f"# {base_model.split('/')[-1] if base_model else 'Model'} with {info.method} ×{info.factor:g} context",
        "",
        f"{origin} with its context window extended by [longctx-hf](https://pypi.org/project/longctx-hf/). "
        "Only the configuration changed: the weights are the source's, byte for byte.",
        "",
        f"- method: `{info.method}` (options: {options})",
        f"- factor: {info.factor:g}",
        f"- context: {info.pretrained_length} (pretrained) → {info.extended_length} (extended) tokens",
        f"- attention scaling: {info.attention_scaling:.6g}",
    ]
    lines += [f"- warning: {warning}" for warning in info.warnings]
    return "\n".join(lines)


def _config_snippet(config: dict) -> str:
    snippet = {key: config[key] for key in CONFIG_KEYS if key in config}
    return "## Configuration\n\n```json\n" + json.dumps(snippet, indent=2, sort_keys=True) + "\n```"


def _how_to_load(name: str, remote_code: bool) -> str:
    extra = ", trust_remote_code=True" if remote_code else ""
    note = ("This method needs the modeling code shipped in this repository, hence `trust_remote_code=True`."
            if remote_code else "Plain transformers loads it; longctx-hf is not needed.")
    return (f"## How to load\n\n{note}\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{name}"{extra})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n```')


ENGINE_VERDICTS = {"same": "computes the same model (equal prompt log-probabilities)",
                   "refuses": "refuses to load it (fails loudly)",
                   "different": "**loads it and silently computes a different model**"}


def _engines(info) -> list:
    """The serving engines measured on this kind of checkpoint (longctx_hf/engines.py), or nothing."""
    if not info.engines:
        return []
    lines = ["## Serving engines", "", f"Measured by longctx-hf ({MEASURED_WITH}) on checkpoints like this one:", ""]
    lines += [f"- {engine}: {ENGINE_VERDICTS[verdict]}" for engine, verdict in info.engines.items()]
    return ["\n".join(lines)]


def _evaluation(results: dict, plots: dict) -> str:
    lines = ["## Evaluation", ""]
    if results.get("text"):
        lines += [f"Text: {results['text']}.", ""]
    perplexity = [(run, row) for run in results["runs"] for row in run.get("perplexity", ())]
    if perplexity:
        lines += ["| method | factor | length | perplexity | baseline perplexity | tokens scored |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {run.get('method')} | {run.get('factor', '')} | {row.get('length')} | {_number(row.get('ppl'))} "
                  f"| {_number(row.get('baseline_ppl'))} | {row.get('tokens_scored', '')} |" for run, row in perplexity]
        if results.get("baseline"):
            lines += ["", f"Baseline: {results['baseline']}."]
        lines.append("")
    passkey = [(run, row) for run in results["runs"] for row in run.get("passkey", ())]
    if passkey:
        lines += ["| method | factor | length | depth | correct / trials |", "|---|---|---|---|---|"]
        lines += [f"| {run.get('method')} | {run.get('factor', '')} | {row.get('length')} | {row.get('depth')} "
                  f"| {row.get('correct')} / {row.get('trials')} |" for run, row in passkey]
        lines.append("")
    lines += [f"![{Path(name).stem}]({name})" for name in plots]
    return "\n".join(lines).rstrip()


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else ""
