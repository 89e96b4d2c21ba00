"""Complete a GGUF written by llama.cpp's converter with what the converter drops: LongRoPE's per-frequency factors.

llama.cpp's LLaMA graph serves LongRoPE natively (it divides each rotary frequency by a per-frequency factor
tensor and multiplies cos/sin by the GGUF key `<arch>.rope.scaling.attn_factor`, exactly as transformers' longrope
does), but `convert_hf_to_gguf.py` writes the factor tensors for Phi-3 only. For a LLaMA checkpoint it writes rope
type 'longrope' and no factors, and llama.cpp then runs the unextended model. This module copies the converted GGUF
and adds what the checkpoint's config says: `rope_factors_long` / `rope_factors_short` (equal, as every longrope
checkpoint longctx_hf writes has one factor set), the attention factor, and the pretrained length.

    longctx-hf gguf CHECKPOINT CONVERTED.gguf --output OUT.gguf
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

LONG_TENSOR, SHORT_TENSOR = "rope_factors_long.weight", "rope_factors_short.weight"
# GGUF architectures whose llama.cpp graph reads the two tensors when the rope type is longrope (llama.cpp as
# vendored by llama-cpp-python 0.3.36, src/models/*.cpp); measured against transformers: llama
ARCHITECTURES = ("llama", "mistral3", "granite", "minicpm", "deci", "apertus", "refact", "phi3")
FACTOR_TENSORS = (LONG_TENSOR, SHORT_TENSOR, "rope_freqs.weight")  # any of these: the file already has factors


def longrope_settings(checkpoint) -> dict:
    """{factors, attention_factor, pretrained_length, extended_length} of a longrope checkpoint's config.json, by
    transformers' rules (modeling_rope_utils' longrope init: `factor` defaults to max_position_embeddings /
    original_max_position_embeddings, the attention factor to sqrt(1 + ln s / ln L)); a ValueError for any other
    rope type (the others need nothing added: docs/engines.md). Reads the file only: no model, no torch."""
    config_file = Path(checkpoint) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"checkpoint must be a folder with config.json; not found: {config_file}")
    from .hf_config import rope_parameters_of

    config = json.loads(config_file.read_text())
    rope = rope_parameters_of(config)
    rope_type = rope["rope_type"]
    if rope_type != "longrope":
        raise ValueError(f"{checkpoint} has rope type {rope_type!r}; only 'longrope' checkpoints need their GGUF "
                         "completed (llama.cpp's converter keeps the other methods' settings or cannot express "
                         "them; see docs/engines.md)")
    long_factor, short_factor = rope.get("long_factor"), rope.get("short_factor")
    if long_factor is None or short_factor is None or list(long_factor) != list(short_factor):
        raise ValueError("this checkpoint's short and long factors differ (or one is missing); llama.cpp picks one "
                         "set from the context size it is given, transformers from each sequence's length, so no "
                         "GGUF can mean the same as this config. Write one set (extend_context's default)")
    original = rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
    if not original:
        raise ValueError(f"{checkpoint}: its longrope config names no original_max_position_embeddings")
    extended = int(config["max_position_embeddings"])
    factor = rope.get("factor") or extended / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"factors": [float(f) for f in long_factor], "attention_factor": float(attention_factor),
            "pretrained_length": int(original), "extended_length": extended}


def complete_gguf(checkpoint, converted, output, *, overwrite: bool = False) -> Path:
    """Write `output`: the GGUF `converted` (llama.cpp's converter run on `checkpoint`) with the checkpoint's
    longrope factors, attention factor and pretrained length added. Checks everything before writing; the file
    appears complete or not at all, and an existing `output` is replaced only with `overwrite=True`."""
    import numpy as np

    try:
        from gguf import GGUFReader, GGUFValueType, GGUFWriter
    except ImportError as err:
        raise ImportError("longctx-hf gguf needs the gguf package: pip install 'longctx-hf[gguf]'") from err

    settings = longrope_settings(checkpoint)
    converted, output = Path(converted), Path(output)
    if not converted.is_file():
        raise ValueError(f"converted must be a GGUF file written by convert_hf_to_gguf.py; not found: {converted}")
    if output.resolve() == converted.resolve():
        raise ValueError("output must be a new file, not the converted GGUF itself")
    if output.exists() and not overwrite:
        raise ValueError(f"output {output} exists; pass overwrite=True (--overwrite) to replace it")
    try:
        reader = GGUFReader(str(converted))
    except Exception as err:  # gguf raises ValueError/struct errors of its own for a non-GGUF file
        raise ValueError(f"{converted} is not a readable GGUF file: {err}") from err
    if reader.endianess.name != "LITTLE":
        raise ValueError(f"{converted} is a big-endian GGUF; only little-endian files (the converter's default) "
                         "are supported")
    arch = _field_value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{converted} has architecture {arch!r}; llama.cpp reads per-frequency rope factors for "
                         f"{ARCHITECTURES} only, and would refuse the completed file")
    scale = _field_value(reader, f"{arch}.rope.scaling.factor")
    if scale is not None and float(scale) != 1.0:
        raise ValueError(f"{converted} sets {arch}.rope.scaling.factor = {scale}; llama.cpp would scale the "
                         "frequencies by it on top of the factors. Give the converter's output of this checkpoint")
    rotary_dim = _field_value(reader, f"{arch}.rope.dimension_count")
    pairs = len(settings["factors"])
    if rotary_dim is not None and int(rotary_dim) != 2 * pairs:
        raise ValueError(f"{converted} rotates {rotary_dim} dimensions, but the checkpoint has {pairs} factors "
                         f"({2 * pairs} dimensions): is it the conversion of this checkpoint?")
    present = [tensor.name for tensor in reader.tensors if tensor.name in FACTOR_TENSORS]
    if present:
        raise ValueError(f"{converted} already holds rope factor tensors {present}; give the converter's output")

    replaced = {
        f"{arch}.rope.scaling.type": ("longrope", GGUFValueType.STRING),
        f"{arch}.rope.scaling.attn_factor": (settings["attention_factor"], GGUFValueType.FLOAT32),
        f"{arch}.rope.scaling.original_context_length": (settings["pretrained_length"], GGUFValueType.UINT32),
        f"{arch}.context_length": (settings["extended_length"], GGUFValueType.UINT32),
    }
    factors = np.asarray(settings["factors"], dtype=np.float32)
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=output.parent, prefix=".tmp-", suffix=".gguf")
    os.close(handle)
    try:
        writer = GGUFWriter(temporary, arch)  # little-endian, as the input
        for field in reader.fields.values():
            if field.name == "general.architecture" or field.name.startswith("GGUF.") or field.name in replaced:
                continue
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
        for key, (value, value_type) in replaced.items():
            writer.add_key_value(key, value, value_type)
        for tensor in reader.tensors:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                   tensor.tensor_type)
        for name in (LONG_TENSOR, SHORT_TENSOR):
            writer.add_tensor_info(name, factors.shape, factors.dtype, factors.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            writer.write_tensor_data(tensor.data)
        for _ in (LONG_TENSOR, SHORT_TENSOR):
            writer.write_tensor_data(factors)
        writer.close()
        os.replace(temporary, output)
    except BaseException:
        os.unlink(temporary)
        raise
    return output


def _field_value(reader, key):
    field = reader.get_field(key)
    return None if field is None else field.contents()
