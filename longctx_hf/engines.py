"""What the serving engines users deploy to do with each method's checkpoints: measured, not believed.

Every verdict comes from benchmarks/engines/engine_matrix.py (checkpoints written by `longctx-hf extend` from the
real SmolLM2-135M, a 12,000-token prompt, fp32, each engine's prompt log-probabilities against plain
transformers); tests/test_engines.py keeps this table equal to its committed output,
benchmarks/results/engine_matrix.json. `info`, the model card and a save-time warning read it from here.
"""
from __future__ import annotations

import math
from dataclasses import fields

from .methods import yarn

MEASURED_WITH = "vLLM 0.32 (CPU build) and llama-cpp-python 0.3.36 with its own convert_hf_to_gguf.py"
SAME, REFUSES, DIFFERENT = "same", "refuses", "different"
VLLM, VLLM_TRANSFORMERS, LLAMA_CPP = "vLLM", "vLLM model_impl='transformers'", "llama.cpp"
SILENT = "silently computes a different model"  # the phrase that marks an engine warning among a config's warnings
YARN_WITH_OPTIONS = "yarn with options"  # any non-default yarn option (betas, attention_factor, mscale)

# {checkpoint kind: {engine: verdict}}: "same" = equal log-probabilities, "refuses" = fails loudly at load,
# "different" = loads and silently computes another model. A kind or engine missing here was not measured.
ENGINES = {
    "pi": {VLLM: SAME, LLAMA_CPP: SAME},
    "ntk": {VLLM: SAME, LLAMA_CPP: SAME},
    "yarn": {VLLM: SAME, LLAMA_CPP: SAME},
    YARN_WITH_OPTIONS: {VLLM: SAME, LLAMA_CPP: DIFFERENT},
    "longrope": {VLLM: SAME, LLAMA_CPP: DIFFERENT},
    "dynamic_ntk": {VLLM: DIFFERENT, VLLM_TRANSFORMERS: DIFFERENT, LLAMA_CPP: DIFFERENT},
    "dynamic_yarn": {VLLM: REFUSES, VLLM_TRANSFORMERS: REFUSES, LLAMA_CPP: DIFFERENT},
    "dynamic_longrope": {VLLM: REFUSES, VLLM_TRANSFORMERS: REFUSES},
    "self_extend": {VLLM: REFUSES, VLLM_TRANSFORMERS: REFUSES, LLAMA_CPP: DIFFERENT},
}
# Why an engine computes something else, and the setting that makes it exact where one was measured to.
REASONS = {
    ("dynamic_ntk", VLLM): "its rotary table stops at max_position_embeddings (kept at the pretrained length for "
                           "transformers' threshold) with the base unchanged, while it derives twice that length; "
                           "served with max_model_len=<pretrained length> it is exact and refuses longer prompts",
    ("dynamic_ntk", LLAMA_CPP): "its converter drops rope_type 'dynamic': plain RoPE",
    ("dynamic_yarn", LLAMA_CPP): "its converter drops the unknown rope type: plain RoPE",
    ("self_extend", LLAMA_CPP): "its converter drops the unknown rope type: the unextended model",
    ("longrope", LLAMA_CPP): "its LLaMA converter writes no per-frequency factors; `longctx-hf gguf CHECKPOINT "
                             "CONVERTED.gguf --output OUT.gguf` adds them, and OUT.gguf computes the same model",
    (YARN_WITH_OPTIONS, LLAMA_CPP): "its loader never reads the converted yarn options and runs default YaRN",
}


class EngineWarning(UserWarning):
    """Emitted when a checkpoint is written that a serving engine would load and silently compute differently."""


def kind_of(method: str, options: dict) -> str:
    """The ENGINES key of a checkpoint: its method, split for yarn with non-default options."""
    defaults = {f.name: f.default for f in fields(yarn.Spec) if f.name in yarn.Spec.option_names()}
    if method == "yarn" and any(options.get(key) not in (None, default) for key, default in defaults.items()):
        return YARN_WITH_OPTIONS
    return method


def llama_cpp_yarn_settings(factor: float, options: dict) -> dict:
    """The llama_cpp.Llama(...) keywords that reproduce a yarn config's options in llama.cpp, whose LLaMA loader
    ignores the converted ones: the betas as run-time options, and the temperature through the GGUF key
    `<arch>.rope.scaling.attn_factor` (llama.cpp multiplies its default 0.1 ln(s) + 1 by it, and overrides a
    `yarn_attn_factor` option for YaRN models), so transformers' temperature T becomes T / (0.1 ln(s) + 1)."""
    settings = {f"yarn_{key}": float(options[key]) for key in ("beta_fast", "beta_slow") if key in options}
    spec = yarn.Spec(factor=factor, rope_theta=2.0, rotary_dim=2, original_max_position_embeddings=1,
                     **{key: options[key] for key in ("attention_factor", "mscale", "mscale_all_dim") if key in options})
    temperature, default = yarn.attention_scaling(spec), 0.1 * math.log(factor) + 1.0
    if not math.isclose(temperature, default, rel_tol=1e-12):
        settings["kv_overrides"] = {"llama.rope.scaling.attn_factor": temperature / default}
    return settings


def engine_notes(method: str, factor: float, options: dict) -> tuple[dict, list]:
    """({engine: verdict}, [warnings for the engines that silently compute something else])."""
    kind = kind_of(method, options)
    verdicts = dict(ENGINES.get(kind, {}))
    warnings = []
    for engine, verdict in verdicts.items():
        if verdict != DIFFERENT:
            continue
        reason = REASONS.get((kind, engine), "")
        if kind == YARN_WITH_OPTIONS and engine == LLAMA_CPP:
            settings = ", ".join(f"{k}={v!r}" for k, v in llama_cpp_yarn_settings(factor, options).items())
            reason += (f"; llama_cpp.Llama(..., {settings}) reproduces it (the key's prefix is the GGUF's "
                       "general.architecture: llama for LLaMA)")
        warnings.append(f"{engine} {SILENT} ({reason}; measured with {MEASURED_WITH})")
    return verdicts, warnings


def warn_about_engines(info) -> None:
    """One EngineWarning per engine that would silently run something else (`info`: a hf_config.ContextInfo)."""
    import warnings

    for text in info.warnings:
        if SILENT in text:
            warnings.warn(text, EngineWarning, stacklevel=3)
