"""LongRoPE (method `longrope`): per-frequency factors, exact against the paper's formula and transformers' own
longrope init, a native config that plain transformers reloads to identical logits, clear refusals."""
import json
import math

import pytest
import torch
from fresh_process import run_json
from models import tiny_model
from test_cli import run
from test_methods import paper_inv_freq, paper_yarn
from test_roundtrip import RELOAD
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longctx_hf import _compat, context_info, extend_context, methods

L = 256


def spec(d=64, theta=1e5, length=8192, s=4.0, **options):
    return methods.build_spec(methods.longrope, factor=s, rope_theta=theta, rotary_dim=d,
                              original_max_position_embeddings=length, options=options)


@pytest.mark.parametrize("d,theta,length,s", [(64, 1e5, 8192, 2.0), (128, 5e5, 4096, 8.0), (96, 1e4, 2048, 3.5)])
def test_formula_matches_the_paper_and_transformers(d, theta, length, s):
    factors = [1.0 + 0.5 * i for i in range(d // 2)]  # any non-decreasing list >= 1
    sp = spec(d, theta, length, s, long_factor=factors)
    inv, scaling = methods.longrope.frequencies(sp)
    want = torch.tensor([f / lam for f, lam in zip(paper_inv_freq(theta, d), factors)], dtype=torch.float64)
    assert inv.dtype == torch.float32 and ((inv.double() - want).abs() / want).max().item() <= 1e-6
    assert scaling == pytest.approx(math.sqrt(1 + math.log(s) / math.log(length)), rel=1e-12)
    heads = 4
    config = LlamaConfig(hidden_size=d * heads, num_attention_heads=heads, max_position_embeddings=int(length * s),
                         rope_parameters=methods.longrope.rope_parameters(sp))
    for n in (None, 2 * length):  # transformers' short set below L, long set past it: the same list here
        theirs, their_scaling = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=n)
        assert ((inv.double() - theirs.double()).abs() / theirs.double()).max().item() <= 2e-6
        assert their_scaling == pytest.approx(scaling, rel=1e-12)


def test_default_factors_are_yarns_ramp():
    """Without factors: YaRN's frequencies written as LongRoPE factors (the seed of the LongRoPE search)."""
    sp = spec(64, 1e4, 4096, 8.0)
    want, _ = paper_yarn(1e4, 64, 4096, 8.0)
    inv, _ = methods.longrope.frequencies(sp)
    assert ((inv.double() - torch.tensor(want)).abs() / torch.tensor(want)).max().item() <= 1e-6
    assert sp.long_factor[0] == 1.0 and sp.long_factor[-1] == pytest.approx(8.0)
    assert sp.short_factor == sp.long_factor


@pytest.mark.parametrize("options,error,match", [
    ({"long_factor": [1.0] * 31}, ValueError, "rotary_dim / 2 = 32 numbers.*got 31"),
    ({"long_factor": [1.0] * 31 + [float("nan")]}, ValueError, r"long_factor\[31\] must be a finite"),
    ({"long_factor": [1.0] * 31 + [0.5]}, ValueError, r"long_factor\[31\] must be >= 1"),
    ({"long_factor": "1,2"}, TypeError, "long_factor must be a list of 32 numbers"),
    ({"long_factor": [1.0] * 32, "short_factor": [1.0] * 31 + [2.0]}, ValueError, "short_factor must equal"),
    ({"attention_factor": 0.0}, ValueError, "attention_factor must be > 0"),
])
def test_bad_factors_are_refused_before_the_model_changes(options, error, match):
    model = tiny_model("llama", max_position_embeddings=L, head_dim=64)
    before = model.config.to_dict()
    with pytest.raises(error, match=match):
        extend_context(model, "longrope", 4, **options)
    assert model.config.to_dict() == before


def test_native_config_reloads_with_plain_transformers_to_identical_logits(tmp_path):
    folders = []
    for kind in ("llama", "gpt_neox"):  # gpt_neox: partial rotary
        model = tiny_model(kind, max_position_embeddings=L)
        rotary_half = [m for m in model.modules() if hasattr(m, "inv_freq")][0].inv_freq.numel()
        factors = [1.0 + 3.0 * i / (rotary_half - 1) for i in range(rotary_half)]
        extend_context(model, "longrope", 4, long_factor=factors, attention_factor=1.2)
        saved = model.config.to_dict()
        assert saved["rope_parameters"]["long_factor"] == saved["rope_parameters"]["short_factor"] == factors
        assert saved["rope_scaling"]["type"] == "longrope" and saved["max_position_embeddings"] == 4 * L
        info = context_info(model)
        assert info.method == "longrope" and info.attention_scaling == pytest.approx(1.2)
        ids = torch.randint(0, 128, (1, 3 * L), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            logits = model(ids).logits
        folder = tmp_path / kind
        model.save_pretrained(folder)
        torch.save({"ids": ids, "logits": logits}, folder / "expected.pt")
        folders.append(str(folder))
    assert run_json(RELOAD, json.dumps(folders), cwd=tmp_path) == {folder: True for folder in folders}


def vllm_longrope_temperature(config: dict) -> float:
    """The cos/sin multiplier vLLM 0.32 serves a longrope config with (Phi3LongRoPEScaledRotaryEmbedding, both
    sets): `short_mscale`/`long_mscale` from rope_parameters, else its own sqrt(1 + ln s / ln L) with s from
    max_position_embeddings; it never reads attention_factor."""
    rope = config["rope_parameters"]
    original = rope["original_max_position_embeddings"]
    scale = config["max_position_embeddings"] / original
    default = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original))
    assert rope.get("short_mscale", default) == rope.get("long_mscale", default)
    return rope.get("long_mscale", default)


@pytest.mark.parametrize("options", [{}, {"attention_factor": 1.0706}, {"attention_factor": 1.0}])
def test_the_temperature_vllm_reads_is_the_one_transformers_uses(tmp_path, options):
    """A searched temperature must not be dropped by vLLM (benchmarks/engines measures the real engine)."""
    model = tiny_model("llama", max_position_embeddings=L)
    extend_context(model, "longrope", 2, **options)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert vllm_longrope_temperature(saved) == pytest.approx(context_info(model).attention_scaling, rel=1e-12)
    assert saved["rope_scaling"].get("long_mscale") == saved["rope_parameters"].get("long_mscale")


def test_offline_rewriter_and_factors_file(tmp_path):
    model = tiny_model("llama", max_position_embeddings=L)
    model.save_pretrained(tmp_path / "src")
    factors = [1.0 + i / 7 for i in range(8)]  # head_dim 16: 8 frequencies
    (tmp_path / "factors.json").write_text(json.dumps(factors))
    out = run("extend", str(tmp_path / "src"), "--method", "longrope", "--factor", "4", "--factors",
              str(tmp_path / "factors.json"), "--output", str(tmp_path / "offline"))
    assert out.returncode == 0, out.stderr
    extend_context(model, "longrope", 4, long_factor=factors)
    model.save_pretrained(tmp_path / "memory")
    offline = json.loads((tmp_path / "offline" / "config.json").read_text())
    assert offline == json.loads((tmp_path / "memory" / "config.json").read_text())
    bad = run("extend", str(tmp_path / "src"), "--method", "longrope", "--factor", "4", "--factors",
              str(tmp_path / "factors.json"), "--long-factor", json.dumps(factors), "--output", str(tmp_path / "x"))
    assert bad.returncode == 2 and "both give long_factor" in bad.stderr and not (tmp_path / "x").exists()



def cached_and_recomputed(model, ids, prefill):
    """Last-token logits of every step of a cached generation over `ids` after a prefill, and of a fresh forward of
    each step's whole prefix (what the model means at that length)."""
    keyword = _compat.cache_keyword(model)  # transformers 5.24 renamed past_key_values
    with torch.no_grad():
        cache, cached, fresh = _compat.output_cache(model(ids[:, :prefill], use_cache=True)), [], []
        for p in range(prefill, ids.shape[1]):
            out = model(ids[:, p:p + 1], **{keyword: cache}, use_cache=True)
            cache = _compat.output_cache(out)
            cached.append(out.logits[0, -1])
            fresh.append(model(ids[:, :p + 1]).logits[0, -1])
    return torch.stack(cached), torch.stack(fresh)


def test_transformers_own_short_long_switch_is_cache_inexact():
    """Why longrope is written with short_factor == long_factor: with two sets, transformers switches to the long
    factors once the sequence passes L and keeps the keys it cached with the short ones. A cached generation then
    stops meaning what a fresh forward of the same tokens means, exactly from the step that crosses L."""
    original = 64
    half = 8  # rotary pairs of the tiny model (head_dim 16)
    rope = {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": original,
            "short_factor": [1.0] * half, "long_factor": [1.0 + 3.0 * i / (half - 1) for i in range(half)]}
    switching = tiny_model("llama", max_position_embeddings=4 * original, rope_parameters=rope)
    ids = torch.randint(0, 128, (1, original + 24), generator=torch.Generator().manual_seed(3))
    cached, fresh = cached_and_recomputed(switching, ids, prefill=original - 16)
    gap = (cached - fresh).abs().amax(dim=-1)  # step k decodes position original - 16 + k
    assert gap[:16].max() < 1e-5  # up to length L: short factors on both sides
    assert gap[16:].min() > 1e-3  # past L: new keys long, cached keys short; the recompute is long throughout

    # One set (what extend_context writes): the cached generation is the recompute at every step.
    model = tiny_model("llama", max_position_embeddings=original)
    extend_context(model, "longrope", 4, long_factor=rope["long_factor"])
    cached, fresh = cached_and_recomputed(model, ids, prefill=original - 16)
    torch.testing.assert_close(cached, fresh, rtol=1e-4, atol=1e-5)
