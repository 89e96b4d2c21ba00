"""The patcher on real tiny transformers models: native parity, replacement, validation, dtypes, devices."""
import copy

import pytest
import torch
from models import tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

from longctx_hf import context_info, extend_context

METHODS = [("pi", {}), ("ntk", {}), ("dynamic_ntk", {}), ("yarn", {}), ("yarn", {"beta_fast": 128, "beta_slow": 2})]


def native_twin(model):
    """A model transformers builds itself from the patched config, with the same weights."""
    config = copy.deepcopy(model.config)
    config.__dict__.pop("rope_scaling", None)
    config._attn_implementation_internal = "sdpa"  # transformers' own attention, not longctx_hf's dynamic runtime
    twin = AutoModelForCausalLM.from_config(config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("method,options", METHODS)
def test_logits_equal_transformers_native(llama, method, options):
    ids = torch.randint(0, 128, (2, 700))  # beyond the pretrained 256, so dynamic scaling is active
    before = llama(ids).logits
    assert extend_context(llama, method, 4, **options) is llama
    after = llama(ids).logits
    assert not torch.allclose(before, after)
    if method == "dynamic_ntk":
        # Up to the pretrained length it is transformers' dynamic NTK bit for bit; past it, longctx_hf computes every
        # token at its own length (cache-exact, tests/test_dynamic_cache.py) where transformers uses the last length.
        ids = ids[:, :256]
        assert not torch.allclose(after[:, :256], native_twin(llama)(torch.cat([ids, ids], 1)).logits[:, :256])
        after = llama(ids).logits
    assert torch.equal(after, native_twin(llama)(ids).logits)


def test_reextending_replaces_never_stacks():
    twice = extend_context(extend_context(tiny_model(), "yarn", 4), "yarn", 2)
    once = extend_context(tiny_model(), "yarn", 2)
    assert twice.config.to_dict() == once.config.to_dict()
    assert torch.equal(twice.model.rotary_emb.inv_freq, once.model.rotary_emb.inv_freq)
    ntk_then_pi = extend_context(extend_context(tiny_model(), "ntk", 8), "pi", 2)
    assert ntk_then_pi.config.rope_parameters["rope_theta"] == 10000.0
    assert ntk_then_pi.config.max_position_embeddings == 256
    info = context_info(twice)
    assert (info.method, info.factor, info.pretrained_length, info.extended_length) == ("yarn", 2.0, 256, 512)


def test_target_length_and_original_override(llama):
    extend_context(llama, "yarn", target_length=2048)
    assert context_info(llama).factor == 8.0 and llama.config.max_position_embeddings == 2048
    extend_context(llama, "yarn", 2, original_max_position_embeddings=128)
    assert llama.config.rope_parameters["original_max_position_embeddings"] == 128
    assert llama.config.max_position_embeddings == 256


def test_portable_config_keys(llama):
    extend_context(llama, "yarn", 4)
    d = llama.config.to_dict()
    assert d["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                    "original_max_position_embeddings": 256, "beta_fast": 32.0, "beta_slow": 1.0}
    assert isinstance(d["rope_parameters"]["factor"], float)
    assert d["rope_scaling"] == {"rope_type": "yarn", "type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 256, "beta_fast": 32.0, "beta_slow": 1.0}
    assert d["rope_theta"] == 10000.0 and d["max_position_embeddings"] == 1024
    extend_context(llama, "ntk", 4)
    d = llama.config.to_dict()
    assert "rope_scaling" not in d and d["rope_parameters"]["rope_type"] == "default"
    assert d["rope_theta"] == pytest.approx(10000.0 * 4 ** (16 / 14)) and d["max_position_embeddings"] == 1024
    extend_context(llama, "dynamic", 4)
    d = llama.config.to_dict()
    assert d["max_position_embeddings"] == 256 and d["rope_scaling"]["type"] == "dynamic"


def snapshot(model):
    rotary = model.model.rotary_emb
    return (copy.deepcopy(model.config.to_dict()), {k: v.clone() for k, v in rotary.named_buffers()},
            {k: v for k, v in vars(rotary).items() if not k.startswith("_")})


@pytest.mark.parametrize("args,kwargs,error", [
    (("yarn", 1.0), {}, ValueError), (("yarn", float("nan")), {}, ValueError), (("yarn", "2"), {}, TypeError),
    (("yarn",), {}, ValueError), (("yarn", 2), {"target_length": 512}, ValueError),
    (("yarn",), {"target_length": 100}, ValueError), (("nope", 2), {}, ValueError), ((None, 2), {}, TypeError),
    (("yarn", 2), {"beta_fast": 1}, ValueError), (("pi", 2), {"beta_fast": 8}, ValueError),
    (("yarn", 2), {"original_max_position_embeddings": 0}, ValueError),
    (("yarn", 2), {"original_max_position_embeddings": -5}, ValueError),
])
def test_bad_input_leaves_model_untouched(llama, args, kwargs, error):
    extend_context(llama, "yarn", 2)
    before = snapshot(llama)
    with pytest.raises(error):
        extend_context(llama, *args, **kwargs)
    after = snapshot(llama)
    assert before[0] == after[0] and before[2] == after[2]
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_not_a_model_and_no_rope():
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        extend_context(torch.nn.Linear(2, 2), "yarn", 2)
    gpt2 = AutoModelForCausalLM.from_config(
        __import__("transformers").GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="no rotary embedding.*Llama, Mistral"):
        extend_context(gpt2, "yarn", 2)


def test_per_layer_rope_is_refused():
    model = tiny_model("gemma3_text", head_dim=16)
    before = model.config.to_dict()
    with pytest.raises(ValueError, match="different RoPE per layer type"):
        extend_context(model, "yarn", 2)
    assert model.config.to_dict() == before


def test_bf16_model_keeps_float32_frequencies():
    model = tiny_model().to(torch.bfloat16)
    extend_context(model, "yarn", 8)
    fp32 = extend_context(tiny_model(), "yarn", 8)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, fp32.model.rotary_emb.inv_freq)


def test_meta_device_model_allocates_nothing():
    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=2, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    extend_context(model, "yarn", 16)
    assert model.model.rotary_emb.inv_freq.is_meta
    assert model.config.max_position_embeddings == 131072


def test_every_runtime_satisfies_the_runtime_contract():
    import types

    from longctx_hf import runtimes

    for module in set(runtimes.RUNTIMES.values()):
        runtimes._check_contract(module)  # what the registry checks when it loads
    incomplete = types.ModuleType("incomplete")
    incomplete.check_supported = lambda model, rotary, base: None
    incomplete.activate = lambda model: None  # no base
    with pytest.raises(TypeError, match=r"incomplete must define activate\(model, base\)"):
        runtimes._check_contract(incomplete)
