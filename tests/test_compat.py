"""The compatibility layer: every transformers/torch internal longctx_hf relies on has a contract that holds on the
installed versions, fails loudly (naming the internal and the version) when the internal changes, and is checked
before a model is touched. Plus the refusals that must hold whatever route a static cache takes."""
import inspect

import pytest
import torch
import transformers
from models import tiny_model
from transformers import DynamicCache, StaticCache

from longctx_hf import _compat, extend_context
from longctx_hf.remote import longctx_compat, longctx_self_extend

L = 32
RUNTIME_METHODS = ["dynamic_ntk", "dynamic_yarn", "self_extend"]


@pytest.fixture
def fresh_contracts():
    """Contract results are cached per process: re-check under the test's breakage, and again after it."""
    _compat.forget_results()
    yield
    _compat.forget_results()


@pytest.mark.parametrize("name", _compat.contract_names())
def test_every_contract_holds_on_the_installed_versions(name, fresh_contracts):
    assert _compat.problem(name) is None, f"{name} with transformers {transformers.__version__}: " \
                                          f"{_compat.problem(name)}"


def _break(name, monkeypatch):
    """Change the internal behind contract `name` the way a transformers release could."""
    from transformers import PreTrainedConfig, PreTrainedModel
    from transformers.integrations import flex_attention
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RotaryEmbeddingConfigMixin
    from transformers.models.auto import modeling_auto
    from transformers.models.llama import modeling_llama

    if name == "PreTrainedConfig._attn_implementation_internal":
        monkeypatch.setattr(PreTrainedConfig, "_attn_implementation", property(lambda self: "eager"))
    elif name == "PreTrainedModel._can_set_attn_implementation":
        monkeypatch.delattr(PreTrainedModel, "_can_set_attn_implementation")
    elif name == "eager_attention_forward":
        monkeypatch.delattr(modeling_llama, "eager_attention_forward")
    elif name == "integrations.flex_attention.compile_friendly_flex_attention":
        monkeypatch.setattr(flex_attention, "compile_friendly_flex_attention", lambda query, key, value: None)
    elif name == "modeling_rope_utils.ROPE_INIT_FUNCTIONS":
        monkeypatch.delitem(ROPE_INIT_FUNCTIONS, "yarn")
    elif name == "RotaryEmbeddingConfigMixin._validate_<rope_type>_rope_parameters":
        monkeypatch.delattr(RotaryEmbeddingConfigMixin, "_validate_default_rope_parameters")
    elif name == "modeling_rope_utils.dynamic_rope_update / original_inv_freq":
        # a release whose rotary re-reads its rope type from the config instead of the instance
        original = modeling_llama.LlamaRotaryEmbedding.forward
        monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", lambda self, x, position_ids: tuple(
            2 * t + 1 for t in original(self, x, position_ids)))
    elif name == "cache_utils.Cache.layers / DynamicLayer":
        from transformers import cache_utils

        monkeypatch.setattr(cache_utils, "StaticCache", lambda config, max_cache_len: DynamicCache())
    elif name == "attention modules receive the cache":
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            raise AssertionError("not called")

        monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
    elif name == "models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING":
        monkeypatch.setattr(modeling_auto, "MODEL_FOR_CAUSAL_LM_MAPPING", {})
    elif name == "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu":
        monkeypatch.setattr(longctx_compat, "_flash_cpu_op", lambda: None)
    elif name == _compat.LEGACY_ROPE_SCALING:
        to_dict = PreTrainedConfig.to_dict
        monkeypatch.setattr(PreTrainedConfig, "to_dict", lambda self: {
            k: v for k, v in to_dict(self).items() if k != "rope_scaling"})
    else:
        raise AssertionError(f"no breakage written for contract {name!r}: add one")


@pytest.mark.parametrize("name", _compat.contract_names())
def test_a_changed_internal_is_named_with_the_installed_version(name, monkeypatch, fresh_contracts):
    _break(name, monkeypatch)
    with pytest.raises(_compat.InternalsChanged) as raised:
        _compat.require(name)
    message = str(raised.value)
    assert name in message and transformers.__version__ in message
    assert all(version in message for version in _compat.TESTED_TRANSFORMERS)


@pytest.mark.parametrize("method", RUNTIME_METHODS)
def test_extend_context_refuses_before_any_change_when_a_contract_breaks(method, monkeypatch, fresh_contracts):
    model = tiny_model("llama", max_position_embeddings=L)
    before = model.config.to_dict()
    ids = torch.arange(3 * L)[None] % 128
    with torch.no_grad():
        logits = model(ids).logits
    _break("cache_utils.Cache.layers / DynamicLayer", monkeypatch)
    with pytest.raises(_compat.InternalsChanged, match="DynamicLayer"):
        extend_context(model, method, 4)
    assert model.config.to_dict() == before and model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


def test_a_newer_transformers_is_served_while_its_contracts_hold(monkeypatch, fresh_contracts):
    monkeypatch.setattr(longctx_compat, "_warned", [])
    assert longctx_compat.is_newer_than_tested("5.99.0") and not longctx_compat.is_newer_than_tested("5.25.0")
    assert not longctx_compat.is_newer_than_tested("5.0.0.dev0")
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    with pytest.warns(UserWarning, match="passed its contract check"):
        model = extend_context(tiny_model("llama", max_position_embeddings=L), "dynamic_ntk", 4)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(3 * L)[None] % 128).logits).all()


def test_self_extend_without_the_cpu_flash_kernel_takes_its_explicit_path(monkeypatch, fresh_contracts):
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(3))
    model = extend_context(tiny_model("llama", max_position_embeddings=64), "self_extend", 4, window=16,
                           group_size=6)
    with torch.no_grad():
        with_kernel = model(ids).logits
    calls = []
    monkeypatch.setattr(longctx_compat, "_flash_cpu_op", lambda: None)
    monkeypatch.setattr(longctx_self_extend, "_attend_math", _counting(longctx_self_extend._attend_math, calls))
    _compat.forget_results()
    assert longctx_compat.flash_attention_cpu_with_lse() is None
    with torch.no_grad():
        without = model(ids).logits
    assert calls and (without - with_kernel).abs().max().item() <= 1e-5


def _counting(function, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return counted


# ------------------------------------------------------------------- a static cache, by every route there is
def _static_cache(model, length=64):
    return StaticCache(config=model.config, max_cache_len=length)


def _routes(model):
    """(description, call) for every way transformers offers to run a model with a static cache."""
    ids = torch.zeros(1, 4, dtype=torch.long)
    settings = dict(max_new_tokens=2, pad_token_id=0, do_sample=False)
    keywords = ["past_key_values"] + (["cache"] if "cache" in inspect.signature(type(model).forward).parameters
                                      else [])
    routes = [("generate(cache_implementation='static')",
               lambda: model.generate(ids, cache_implementation="static", **settings))]
    for keyword in keywords:
        routes.append((f"generate({keyword}=StaticCache)",
                       lambda keyword=keyword: model.generate(ids, **{keyword: _static_cache(model)}, **settings)))
        routes.append((f"model({keyword}=StaticCache)",
                       lambda keyword=keyword: model(ids, use_cache=True, **{keyword: _static_cache(model)})))
        routes.append((f"model.model({keyword}=StaticCache)",  # the base model: no top-level hook to rely on
                       lambda keyword=keyword: model.model(ids, use_cache=True, **{keyword: _static_cache(model)})))
    return routes


@pytest.mark.parametrize("method", RUNTIME_METHODS)
def test_a_static_cache_is_refused_by_every_route(method):
    model = extend_context(tiny_model("llama", max_position_embeddings=L), method, 4)
    routes = _routes(model)
    assert len(routes) >= 4
    for description, call in routes:
        with pytest.raises(ValueError, match="supports DynamicCache"):
            with torch.no_grad():
                call()
            pytest.fail(f"{method}: {description} was not refused")
    with torch.no_grad():  # the default cache still works
        out = model(torch.zeros(1, 4, dtype=torch.long), use_cache=True)
    assert _compat.unsupported_cache_layers(_compat.output_cache(out)) == []


@pytest.mark.parametrize("method", RUNTIME_METHODS)
def test_an_attention_switch_is_refused_inside_the_model_too(method):
    model = extend_context(tiny_model("llama", max_position_embeddings=L), method, 4)
    model.set_attn_implementation("eager")
    for call in (model, model.model):
        with pytest.raises(ValueError, match="without positions"):
            call(torch.zeros(1, 4, dtype=torch.long))


def test_self_extend_refuses_packed_sequences():
    model = extend_context(tiny_model("llama", max_position_embeddings=64), "self_extend", 4, window=16,
                           group_size=6)
    ids = torch.randint(0, 128, (1, 120))
    packed = torch.cat([torch.arange(60), torch.arange(60)])[None]
    with pytest.raises(ValueError, match="packed"):
        with torch.no_grad():
            model(ids, position_ids=packed, use_cache=False)
    padded = torch.cat([torch.ones(20, dtype=torch.long), torch.arange(100)])[None]  # generate's left padding
    mask = torch.cat([torch.zeros(20, dtype=torch.long), torch.ones(100, dtype=torch.long)])[None]
    with torch.no_grad():
        model(ids, position_ids=padded, attention_mask=mask, use_cache=False)


def test_cache_keyword_and_output_follow_the_installed_transformers():
    model = tiny_model("llama")
    keyword = _compat.cache_keyword(model)
    assert keyword in inspect.signature(type(model).forward).parameters
    with torch.no_grad():
        first = model(torch.zeros(1, 3, dtype=torch.long), use_cache=True)
        cache = _compat.output_cache(first)
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 3
        model(torch.zeros(1, 1, dtype=torch.long), use_cache=True, **{keyword: cache})
    assert cache.get_seq_length() == 4


def test_one_registration_policy_the_first_copy_serves_and_another_version_says_so(tmp_path):
    """A checkpoint's shipped copy of the runtime, loaded into a process that already registered one: the first
    copy keeps serving; a copy of another runtime version warns instead of silently replacing it or being used."""
    import importlib.util

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from longctx_hf.remote import alibi_modeling

    alibi_modeling.register()
    installed_rope, installed_sdpa = ROPE_INIT_FUNCTIONS["alibi"], ALL_ATTENTION_FUNCTIONS["alibi_sdpa"]
    source = tmp_path / "copy"
    source.mkdir()
    compat_text = open(longctx_compat.__file__, encoding="utf-8").read()
    (source / "longctx_compat.py").write_text(compat_text.replace('RUNTIME_VERSION = "', 'RUNTIME_VERSION = "0.'))
    spec = importlib.util.spec_from_file_location("older_copy_compat", source / "longctx_compat.py")
    older = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(older)
    with pytest.warns(UserWarning, match="already registered by longctx-hf runtime version .* is not used"):
        older.register_rope_type("alibi", lambda *args, **kwargs: None, None)
    with pytest.warns(UserWarning, match="attention 'alibi_sdpa' is already registered"):
        older.register_attention("alibi_sdpa", lambda *args, **kwargs: None, None)
    assert ROPE_INIT_FUNCTIONS["alibi"] is installed_rope and ALL_ATTENTION_FUNCTIONS["alibi_sdpa"] is installed_sdpa
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same version registering again: silent, nothing replaced
        alibi_modeling.register()
    assert ROPE_INIT_FUNCTIONS["alibi"] is installed_rope
