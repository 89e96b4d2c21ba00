"""save_pretrained, then a fresh process that never imports longctx_hf reloads with plain transformers."""
import json
from pathlib import Path

import pytest
import torch
from fresh_process import run_json
from models import tiny_model

from longctx_hf import extend_context

# Phi3 is absent: its config class only admits rope_type 'longrope', and extend_context refuses it clearly.
ARCHITECTURES = {
    "llama": {}, "mistral": {}, "mixtral": {}, "qwen2": {}, "qwen2_moe": {}, "qwen3": {}, "qwen3_moe": {},
    "gemma": {"head_dim": 16}, "gemma2": {"head_dim": 16}, "olmo": {}, "olmo2": {}, "granite": {},
    "granitemoe": {}, "cohere": {}, "stablelm": {}, "gpt_neox": {}, "smollm3": {}, "starcoder2": {},
    "helium": {"head_dim": 16}, "phi": {}, "persimmon": {}, "nemotron": {}, "falcon": {}, "jetmoe": {},
}

RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
results = {}
for folder in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    data = torch.load(folder + "/expected.pt")
    with torch.no_grad():
        logits = model(data["ids"]).logits
    results[folder] = torch.equal(logits, data["logits"])
print(json.dumps(results))
"""


def save_with_expected(model, folder, length):
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(folder)
    torch.save({"ids": ids, "logits": logits}, f"{folder}/expected.pt")


def reload_in_fresh_process(folders):
    return run_json(RELOAD, json.dumps(folders), cwd=Path(folders[0]).parent)


def rotary_reference(model, positions):
    """cos/sin of a YaRN-extended model straight from the paper formula (written in test_methods, not the package's):
    cos(p * inv_freq) * mscale, for the rotary half-dims."""
    from test_methods import paper_yarn

    from longctx_hf.hf_config import RECORD_KEY

    record = model.config.to_dict()[RECORD_KEY]
    assert record["method"] == "yarn" and not record["options"]
    rotary = [m for m in model.modules() if hasattr(m, "inv_freq")][0]
    inv, scale = paper_yarn(record["original_rope_theta"], 2 * rotary.inv_freq.numel(),
                            record["original_max_position_embeddings"], record["factor"])
    angles = positions.double()[:, None] * torch.tensor(inv, dtype=torch.float64)[None, :]
    return torch.cos(angles) * scale, torch.sin(angles) * scale, rotary


@pytest.mark.parametrize("method", ["pi", "ntk", "dynamic_ntk", "yarn"])
def test_llama_mistral_roundtrip_every_method(tmp_path, method):
    folders = []
    for kind in ("llama", "mistral"):
        model = extend_context(tiny_model(kind), method, 4)
        folder = str(tmp_path / kind)
        # 700 > 256 pretrained: scaling is active. Past L, plain transformers runs its own (cache-inexact) dynamic NTK,
        # which differs from longctx_hf's by design: tests/test_dynamic_cache.py covers that reload.
        save_with_expected(model, folder, 256 if method == "dynamic_ntk" else 700)
        folders.append(folder)
    results = reload_in_fresh_process(folders)
    assert all(results.values()), results


def test_architectures(tmp_path):
    """At least 15 standard RoPE decoders: rotary output equals the paper formula, reload equals in-memory."""
    folders = []
    for kind, extra in ARCHITECTURES.items():
        model = extend_context(tiny_model(kind, **extra), "yarn", 4)
        positions = torch.arange(0, 1024, 7)
        cos_ref, sin_ref, rotary = rotary_reference(model, positions)
        cos, sin = rotary(torch.zeros(1, len(positions), 8), positions[None])
        half = rotary.inv_freq.numel()
        # halves layout (Llama) or interleaved (Cohere); float32 angles at p~1000 have ulp ~6e-5
        layouts = [lambda t: t[0, :, :half], lambda t: t[0, :, : 2 * half : 2]]
        assert any(torch.allclose(pick(cos).double(), cos_ref, atol=3e-4)
                   and torch.allclose(pick(sin).double(), sin_ref, atol=3e-4) for pick in layouts), kind
        folder = str(tmp_path / kind)
        save_with_expected(model, folder, 300)
        folders.append(folder)
    results = reload_in_fresh_process(folders)
    assert len(results) >= 15
    assert all(results.values()), results
