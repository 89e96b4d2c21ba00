"""Dynamic NTK / dynamic YaRN stay exact with a KV cache: cached decoding == recomputing the prefix without a cache.

Tiny models pretrained to L = 32 tokens decode 80 tokens past it. The reference is always a forward *without* a
cache; "exact" is float noise (the unextended model's own cached-vs-recompute gap here is ~2e-7).
"""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
from fresh_process import run_json
from models import tiny_model
from transformers import AutoModelForCausalLM

from longctx_hf import _compat, extend_context, methods
from longctx_hf.remote import longctx_dynamic_rope as runtime

L = 32
NEW = 80
TOL = 1e-4
REPO = Path(__file__).resolve().parent.parent
# llama/mistral: standard halves layout; gpt_neox: partial rotary (25% of head_dim); cohere: interleaved pairs
KINDS = ["llama", "mistral", "gpt_neox", "cohere"]
DYNAMIC = ["dynamic_ntk", "dynamic_yarn", "dynamic_longrope"]


def extended(kind, method, seed=0):
    return extend_context(tiny_model(kind, seed=seed, max_position_embeddings=L), method, 4)


def generate(model, ids, attention_mask=None, new=NEW):
    out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, dim=1)


def recompute(model, sequence, prompt_length):
    """Logits for every generated token from forwards without a cache: one over the whole sequence, plus separate
    forwards of a few prefixes (each token depends only on the tokens before it, so both must agree)."""
    with torch.no_grad():
        full = model(sequence[None], use_cache=False).logits[0, prompt_length - 1 : -1]
        for step in range(0, len(full), 32):
            n = prompt_length + step
            prefix = model(sequence[None, :n], use_cache=False).logits[0, -1]
            assert (prefix - full[step]).abs().max().item() <= TOL
    return full


@pytest.mark.parametrize("method", DYNAMIC)
@pytest.mark.parametrize("kind", KINDS)
def test_cached_generate_equals_recompute(kind, method):
    model = extended(kind, method)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    sequences, logits = generate(model, ids)
    assert sequences.shape[1] == 20 + NEW > 3 * L
    error = (logits[0] - recompute(model, sequences[0], 20)).abs().max().item()
    assert error <= TOL, error


def test_transformers_own_dynamic_ntk_is_not_cache_exact():
    """The bug this fixes, reproduced on transformers' native dynamic NTK (same weights, same config)."""
    ours = extended("llama", "dynamic_ntk")
    config = copy.deepcopy(ours.config)
    config._attn_implementation_internal = "sdpa"
    native = AutoModelForCausalLM.from_config(config).eval()
    native.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    sequences, logits = generate(native, ids)
    with torch.no_grad():
        reference = torch.stack([native(sequences[:, :n]).logits[0, -1] for n in range(20, 20 + NEW, 8)])
    assert (logits[0, ::8] - reference).abs().max().item() > 1e-3


@pytest.mark.parametrize("method", DYNAMIC)
def test_left_padded_batch_each_row_equals_its_own_recompute(method):
    model = extended("llama", method)
    long_prompt = torch.randint(1, 128, (20,), generator=torch.Generator().manual_seed(2))
    short_prompt = torch.randint(1, 128, (9,), generator=torch.Generator().manual_seed(3))
    ids = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    ids[0], mask[0] = long_prompt, 1
    ids[1, 11:], mask[1, 11:] = short_prompt, 1
    sequences, logits = generate(model, ids, attention_mask=mask)
    for row, prompt in enumerate((long_prompt, short_prompt)):
        own = torch.cat([prompt, sequences[row, 20:]])  # the row without its padding
        error = (logits[row] - recompute(model, own, len(prompt))).abs().max().item()
        assert error <= TOL, (row, error)


@pytest.mark.parametrize("method", DYNAMIC)
def test_below_pretrained_length_is_the_unextended_model(method):
    plain = tiny_model("llama", max_position_embeddings=L)
    model = extended("llama", method)
    ids = torch.randint(0, 128, (2, L), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    sequences, logits = generate(model, ids[:, :10], new=L - 10)
    plain_sequences, plain_logits = generate(plain, ids[:, :10], new=L - 10)
    assert torch.equal(sequences, plain_sequences) and torch.equal(logits, plain_logits)
    with torch.no_grad():  # and past L it is a different model
        assert not torch.allclose(model(sequences[:, :1].repeat(1, 2 * L)).logits,
                                  plain(sequences[:, :1].repeat(1, 2 * L)).logits)


def reference_dynamic_yarn(theta, d, L, n, beta_fast=32.0, beta_slow=1.0):
    """jquesnelle/yarn's dynamic variant, written out: YaRN at scale s = n / L for n > L, plain RoPE otherwise."""
    plain = [theta ** (-2 * i / d) for i in range(d // 2)]
    s = n / L
    if s <= 1:
        return plain, 1.0

    def dim(rotations):
        return d * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    lo, hi = max(math.floor(dim(beta_fast)), 0), min(math.ceil(dim(beta_slow)), d - 1)
    out = []
    for i, f in enumerate(plain):
        extrapolate = 1 - min(max((i - lo) / (hi - lo), 0.0), 1.0)
        out.append(f / s * (1 - extrapolate) + f * extrapolate)
    return out, 0.1 * math.log(s) + 1


@pytest.mark.parametrize("d,theta,L_,s", [(64, 1e4, 4096, 4.0), (128, 5e5, 8192, 8.0), (16, 1e4, 32, 4.0)])
def test_dynamic_yarn_formula(d, theta, L_, s):
    spec = methods.build_spec(methods.get_method("dynamic_yarn"), factor=s, rope_theta=theta, rotary_dim=d,
                              original_max_position_embeddings=L_, options={"beta_fast": 32, "beta_slow": 1})
    for n in (L_ // 2, L_, L_ + 1, int(1.5 * L_), int(s * L_), int(3 * s * L_)):
        want, want_scale = reference_dynamic_yarn(theta, d, L_, n)
        _assert_method_and_shipped_code_give("dynamic_yarn", spec, n, want, want_scale)


def _assert_method_and_shipped_code_give(method, spec, n, want, want_scale):
    """The method's frequencies at length n and those of the rope function checkpoints ship, against `want`."""
    d, L_ = spec.rotary_dim, spec.original_max_position_embeddings
    module = methods.get_method(method)
    model_config = tiny_model("llama").config.__class__(hidden_size=d * 4, num_attention_heads=4,
                                                        max_position_embeddings=L_,
                                                        rope_parameters=module.rope_parameters(spec))
    shipped = getattr(runtime, f"compute_{method}_parameters")
    want = torch.tensor(want, dtype=torch.float64)
    got, scale = module.frequencies(spec, seq_len=n)
    remote, remote_scale = shipped(model_config, "cpu", seq_len=n)
    for inv in (got, remote):
        assert inv.dtype == torch.float32
        assert ((inv.double() - want).abs() / want).max().item() <= 1e-6
    assert scale == pytest.approx(want_scale, rel=1e-12) and remote_scale == pytest.approx(want_scale, rel=1e-12)


@pytest.mark.parametrize("d,theta,L_,s", [(64, 1e4, 4096, 4.0), (128, 5e5, 8192, 8.0), (16, 1e4, 32, 4.0)])
def test_dynamic_longrope_formula(d, theta, L_, s):
    """Plain RoPE up to L, then inv_i = 1 / (λ_i θ^(2i/d)) with the attention factor (the paper's formula), in the
    method and in the shipped remote code."""
    factors = [1.0 + (s - 1) * (i / (d // 2 - 1)) ** 2 for i in range(d // 2)]
    spec = methods.build_spec(methods.get_method("dynamic_longrope"), factor=s, rope_theta=theta, rotary_dim=d,
                              original_max_position_embeddings=L_,
                              options={"long_factor": factors, "attention_factor": 1.07})
    for n in (L_ // 2, L_, L_ + 1, int(s * L_), int(3 * s * L_)):
        plain = [theta ** (-2 * i / d) for i in range(d // 2)]
        want = plain if n <= L_ else [f / lam for f, lam in zip(plain, factors)]
        want_scale = 1.0 if n <= L_ else 1.07  # a searched temperature, past L only
        _assert_method_and_shipped_code_give("dynamic_longrope", spec, n, want, want_scale)


@pytest.mark.parametrize("method", DYNAMIC)
def test_runtime_frequencies_are_the_method_formula(method):
    model = extended("llama", method)
    state = model.model.layers[0].self_attn._longctx_dynamic_rope
    module = methods.get_method(method)
    spec = module.Spec(factor=4.0, rope_theta=10000.0, rotary_dim=16, original_max_position_embeddings=L)
    for n in (1, L, L + 1, 100, 1000):
        inv, scale = state.frequencies(n, torch.device("cpu"))
        want, want_scale = module.frequencies(spec, seq_len=n)
        assert ((inv.double() - want.double()).abs() / want.double()).max().item() <= 2e-6
        assert scale == pytest.approx(want_scale, rel=1e-6)


def test_refuses_attention_it_cannot_wrap_before_touching_the_model():
    model = tiny_model("llama", max_position_embeddings=L)
    model.config._attn_implementation_internal = "flex_attention"
    before = model.config.to_dict()
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        extend_context(model, "dynamic_yarn", 4)
    assert model.config.to_dict() == before and model.config._attn_implementation == "flex_attention"


def test_gradients_flow_past_pretrained_length():
    model = extended("llama", "dynamic_yarn").train()
    loss = model(torch.arange(3 * L)[None] % 128, labels=torch.arange(3 * L)[None] % 128).loss
    loss.backward()
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_refuses_static_cache():
    model = extended("llama", "dynamic_ntk")
    with pytest.raises(ValueError, match="DynamicCache"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2, cache_implementation="static",
                       pad_token_id=0)


def test_refuses_attention_switched_after_extension():
    model = extended("llama", "dynamic_yarn")
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="without positions"):
        model(torch.zeros(1, 4, dtype=torch.long))
    extend_context(model, "dynamic_yarn", 4)  # wraps eager now
    assert model.config._attn_implementation == "longctx_dynamic_rope:eager"
    with torch.no_grad():
        assert torch.allclose(model(torch.arange(100)[None] % 128).logits,
                              extended("llama", "dynamic_yarn")(torch.arange(100)[None] % 128).logits, atol=1e-5)


def test_reextending_with_a_static_method_removes_the_runtime(tmp_path):
    model = extend_context(extended("llama", "dynamic_yarn"), "yarn", 4)
    fresh = extend_context(tiny_model("llama", max_position_embeddings=L), "yarn", 4)
    assert model.config._attn_implementation == "sdpa" and "auto_map" not in model.config.to_dict()
    ids = torch.randint(0, 128, (1, 3 * L))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / runtime.REMOTE_FILE).exists()


# ------------------------------------------------------------------------------------------------ reloading
PLAIN_RELOAD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
folders, results = json.loads(sys.argv[1]), {}
for folder in folders:
    remote = json.load(open(folder + "/config.json")).get("auto_map") is not None
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
    data = torch.load(folder + "/expected.pt")
    with torch.no_grad():  # below L first: transformers' dynamic NTK keeps the largest length it has seen
        below = model(data["ids"][:, :32]).logits
        logits = model(data["ids"]).logits
    out = model.generate(data["ids"][:, :20], max_new_tokens=60, min_new_tokens=60, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        full = model(out.sequences).logits[0, 19:-1]
    results[folder] = {
        "rope_type": model.config.rope_parameters["rope_type"],
        "attention": model.config._attn_implementation,
        "equal_below_L": torch.equal(below, data["logits"][:, :32]),
        "equal": torch.equal(logits, data["logits"]),
        "cache_error": (torch.stack(out.logits, 1)[0] - full).abs().max().item(),
    }
print(json.dumps(results))
"""

LONGCTX_RELOAD = r"""
import json, sys, torch
import longctx_hf
results = {}
for folder in json.loads(sys.argv[1]):
    model = longctx_hf.from_pretrained(folder)  # no trust_remote_code: longctx_hf registers dynamic_yarn itself
    data = torch.load(folder + "/expected.pt")
    with torch.no_grad():
        logits = model(data["ids"]).logits
    results[folder] = {"equal": torch.equal(logits, data["logits"]), "attention": model.config._attn_implementation}
print(json.dumps(results))
"""


def test_reload_in_fresh_processes(tmp_path):
    folders = {}
    for method in DYNAMIC:
        model = extended("llama", method)
        folder = tmp_path / method
        ids = torch.randint(0, 128, (1, 3 * L), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            logits = model(ids).logits
        model.save_pretrained(folder)
        torch.save({"ids": ids, "logits": logits}, folder / "expected.pt")
        folders[method] = str(folder)
    config = json.loads((tmp_path / "dynamic_yarn" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "longctx_dynamic_rope.DynamicRopeForCausalLM"}
    assert (tmp_path / "dynamic_yarn" / runtime.REMOTE_FILE).read_text() == Path(runtime.__file__).read_text()
    assert not (tmp_path / "dynamic_ntk" / runtime.REMOTE_FILE).exists()

    listed = json.dumps(list(folders.values()))
    plain = run_json(PLAIN_RELOAD, listed, cwd=tmp_path)
    ntk, yarn = plain[folders["dynamic_ntk"]], plain[folders["dynamic_yarn"]]
    # dynamic_ntk in plain transformers: transformers' own dynamic NTK, exact up to L, cache-inexact past it
    assert (ntk["rope_type"], ntk["attention"]) == ("dynamic", "sdpa") and ntk["equal_below_L"]
    assert not ntk["equal"] and ntk["cache_error"] > 1e-3
    # dynamic_yarn and dynamic_longrope through their remote code, without longctx_hf: identical logits, cache-exact
    for shipped in (yarn, plain[folders["dynamic_longrope"]]):
        assert shipped["attention"] == "longctx_dynamic_rope:sdpa" and shipped["equal"] and shipped["cache_error"] <= TOL

    exact = run_json(LONGCTX_RELOAD, listed, cwd=tmp_path, with_longctx_hf=True)
    assert all(result["equal"] and result["attention"] == "longctx_dynamic_rope:sdpa" for result in exact.values())


@pytest.mark.parametrize("key, value, match", [("long_factor", [1.0, 2.0], "must be a list of 8 numbers"),
                                               ("long_factor", [1.0] * 7 + [0.5], "must be a list of 8 numbers"),
                                               ("attention_factor", -1, r"'attention_factor'\] must be a positive")])
def test_a_saved_dynamic_longrope_config_with_bad_values_fails_on_load(tmp_path, key, value, match):
    from transformers import AutoConfig

    extend_context(tiny_model("llama", max_position_embeddings=L), "dynamic_longrope", 4,
                   attention_factor=1.1).save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters["attention_factor"] == 1.1  # valid as saved
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"][key] = config["rope_scaling"][key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=match):
        AutoConfig.from_pretrained(tmp_path)


def test_a_saved_dynamic_yarn_config_with_bad_values_fails_on_load(tmp_path):
    from transformers import AutoConfig

    extended("llama", "dynamic_yarn").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_type"] == "dynamic_yarn"  # valid as saved
    config["rope_parameters"]["beta_fast"] = config["rope_scaling"]["beta_fast"] = -1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=r"'beta_fast'\] must be a positive number"):
        AutoConfig.from_pretrained(tmp_path)


def _paper_frequencies(method, theta, d, n, s=4.0, L_=L):
    """Frequencies and attention scaling at length n from the papers (not the package): dynamic NTK grows the base,
    dynamic YaRN is YaRN with s = n / L, dynamic LongRoPE switches to its factors past L; all are plain RoPE up to
    L."""
    from test_methods import paper_inv_freq, paper_yarn

    if n <= L_:
        return paper_inv_freq(theta, d), 1.0
    if method == "dynamic_ntk":
        return paper_inv_freq(theta * ((s * n / L_) - (s - 1)) ** (d / (d - 2)), d), 1.0
    if method == "dynamic_longrope":  # default factors: YaRN's frequencies at s, LongRoPE's temperature
        return paper_yarn(theta, d, L_, s)[0], math.sqrt(1 + math.log(s) / math.log(L_))
    return paper_yarn(theta, d, L_, n / L_)


@pytest.mark.parametrize("method", DYNAMIC)
@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "cohere"])
def test_one_layer_model_equals_an_independent_token_by_token_reference(kind, method):
    """In a one-layer model token t's logits depend only on its own query and the keys: the definition ("token t
    attends with the frequencies of length t + 1") is then a plain transformers forward of the first t + 1 tokens
    whose rotary holds the papers' frequencies for that length. Checked for every token of a prompt past 3 L."""
    base = tiny_model(kind, num_hidden_layers=1, max_position_embeddings=L)
    ours = extend_context(copy.deepcopy(base), method, 4)
    ids = torch.randint(0, 128, (1, 3 * L + 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = ours(ids, use_cache=False).logits[0]
    reference = copy.deepcopy(base)
    rotary = [m for m in reference.modules() if hasattr(m, "inv_freq")][0]
    d = 2 * rotary.inv_freq.numel()
    theta = base.config.rope_parameters["rope_theta"]
    worst = 0.0
    for n in range(1, ids.shape[1] + 1):
        inv_freq, scale = _paper_frequencies(method, theta, d, n)
        rotary.inv_freq = torch.tensor(inv_freq, dtype=torch.float32)
        rotary.attention_scaling = scale
        with torch.no_grad():
            want = reference(ids[:, :n], use_cache=False).logits[0, -1]
        worst = max(worst, (logits[n - 1] - want).abs().max().item())
    assert worst <= 1e-5, worst
    with torch.no_grad():  # the unextended model is much farther away: the check can tell them apart
        assert (base(ids, use_cache=False).logits[0, L:] - logits[L:]).abs().max().item() > 20 * max(worst, 1e-6)


# ------------------------------------------------------------------ prompts past L, in blocks of queries
def _decode_token_by_token(model, ids):
    """The definition run literally: one token per forward with a cache, so token t is one query at length t + 1."""
    cache, logits = None, []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out = model(ids[:, t : t + 1], **{_compat.cache_keyword(model): cache}, use_cache=True)
            cache = _compat.output_cache(out)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


def _blocks_used(model):
    active = next(getattr(m, runtime.RUNTIME_ATTRIBUTE) for m in model.modules()
                  if runtime.RUNTIME_ATTRIBUTE in m.__dict__)
    return [block for key, plan in active._memo.items() if key[0] == "blocks" for block in plan]


def _blocks_model(kind, method, attention="sdpa", heads=2, kv_heads=1, dtype=torch.float32):
    base = tiny_model(kind, num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64)
    base.set_attn_implementation(attention)
    return extend_context(base.to(dtype), method, 4)


@pytest.mark.parametrize("method", DYNAMIC)
@pytest.mark.parametrize("kind, attention, heads, kv_heads", [
    ("llama", "sdpa", 2, 1), ("llama", "eager", 2, 1), ("llama", "sdpa", 4, 2), ("gpt_neox", "sdpa", 2, 2),
    ("cohere", "sdpa", 2, 1), ("cohere", "eager", 2, 1), ("gemma2", "eager", 2, 1)])
def test_prefill_in_blocks_equals_decoding_token_by_token(kind, attention, heads, kv_heads, method):
    """One forward over 4 L tokens (blocks of queries with several series terms) against the same tokens decoded one
    by one (each its own attention call with its own frequencies): halves and interleaved layouts, partial rotary
    (gpt_neox), grouped query heads, softcapping (gemma2, eager only: it goes through the wrapped attention), sdpa
    and eager."""
    model = _blocks_model(kind, method, attention, heads, kv_heads)
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        prefill = model(ids).logits
    blocks = _blocks_used(model)
    terms = max(len(b.kept) for b in blocks)  # dynamic_longrope: one frequency set past L, one term
    assert max(b.stop - b.start for b in blocks) > 8 and (terms == 1 if method == "dynamic_longrope" else terms >= 3)
    error = (prefill - _decode_token_by_token(model, ids)).abs().max().item()
    assert error <= 1e-5, error


@pytest.mark.parametrize("method", DYNAMIC)
def test_chunked_prefill_and_the_wrapped_attention_path_equal_decoding_token_by_token(method, monkeypatch):
    """Chunks of 48 tokens with a cache (queries fewer than keys), and the same through the wrapped sdpa with the
    block's own causal mask (what a family with extra attention options takes)."""
    model = _blocks_model("llama", method)
    ids = torch.randint(0, 128, (1, 240), generator=torch.Generator().manual_seed(9))
    reference = _decode_token_by_token(model, ids)
    for plain in (True, False):
        if not plain:
            monkeypatch.setattr(runtime, "PLAIN_ATTENTION_KEYWORDS", ())
        cache, chunks = None, []
        with torch.no_grad():
            for start in range(0, ids.shape[1], 48):
                out = model(ids[:, start : start + 48], **{_compat.cache_keyword(model): cache}, use_cache=True)
                cache = _compat.output_cache(out)
                chunks.append(out.logits)
            whole = model(ids).logits
        for logits in (torch.cat(chunks, dim=1), whole):
            error = (logits - reference).abs().max().item()
            assert error <= 1e-5, (plain, error)


@pytest.mark.parametrize("method", DYNAMIC)
def test_left_padded_batch_through_the_blocks_equals_each_row_alone(method):
    """Two rows past L in one prefill (the blocks loop over rows and key heads), the second left-padded: each row's
    logits equal its own forward without padding."""
    model = _blocks_model("llama", method, heads=4, kv_heads=2)
    generator = torch.Generator().manual_seed(12)
    long_ids = torch.randint(1, 128, (1, 256), generator=generator)
    short_ids = torch.randint(1, 128, (1, 200), generator=generator)
    pad = long_ids.shape[1] - short_ids.shape[1]
    ids = torch.cat([long_ids, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_ids], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        alone = model(long_ids).logits[0], model(short_ids).logits[0]
    assert max(b.stop - b.start for b in _blocks_used(model)) > 8
    for row, (want, got) in enumerate(zip(alone, (batch[0], batch[1, pad:]))):
        error = (got - want).abs().max().item()
        assert error <= 1e-5, (row, error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", DYNAMIC)
def test_block_attention_is_as_close_to_exact_as_one_call_per_query(method, dtype):
    """Random queries and keys large enough for peaked attention, straight into the runtime's attention: the block
    path against float64 attention with the papers' frequencies for every query, next to one call per query in the
    same dtype. In bf16, one call per query computes its angles in float32, so the blocks must keep the series terms
    that needs (a tolerance taken from bf16 alone drops them all)."""
    model = _blocks_model("llama", method, dtype=dtype)
    module = next(m for m in model.modules() if runtime.RUNTIME_ATTRIBUTE in m.__dict__)
    active = getattr(module, runtime.RUNTIME_ATTRIBUTE)
    n, d = 256, 32
    generator = torch.Generator().manual_seed(10)
    query, key, value = (3 * torch.randn(1, heads, n, d, generator=generator, dtype=torch.float64)
                         for heads in (2, 1, 1))
    theta = model.config.rope_parameters["rope_theta"]

    def rotated(states, positions, inv_freq, scale):
        angles = positions[:, None] * torch.tensor(inv_freq, dtype=torch.float64)
        cos, sin = torch.cat([angles.cos()] * 2, -1) * scale, torch.cat([angles.sin()] * 2, -1) * scale
        return states * cos + torch.cat([-states[..., d // 2 :], states[..., : d // 2]], -1) * sin

    exact, single = [], []
    for p in range(n):
        inv_freq, scale = _paper_frequencies(method, theta, d, p + 1, L_=64)
        positions = torch.arange(p + 1, dtype=torch.float64)
        q, k = rotated(query[:, :, p : p + 1], positions[-1:], inv_freq, scale), rotated(key[:, :, : p + 1], positions,
                                                                                          inv_freq, scale)
        weights = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1)
        exact.append((weights @ value[:, :, : p + 1]).transpose(1, 2))
        with torch.no_grad():
            single.append(active.attention(module, query[:, :, p : p + 1].to(dtype), key[:, :, : p + 1].to(dtype),
                                           value[:, :, : p + 1].to(dtype), None, position_ids=torch.tensor([[p]]),
                                           scaling=d ** -0.5, dropout=0.0)[0].double())
    exact, single = torch.cat(exact, dim=1), torch.cat(single, dim=1)
    with torch.no_grad():
        blocks = active.attention(module, query.to(dtype), key.to(dtype), value.to(dtype), None,
                                  position_ids=torch.arange(n)[None], scaling=d ** -0.5, dropout=0.0)[0].double()
    one_call_each = (single - exact).abs().max().item()
    assert one_call_each < (1.0 if dtype == torch.bfloat16 else 1e-4)  # values up to ~10: bf16 keeps ~2 digits
    assert (blocks - exact).abs().max().item() <= 2 * one_call_each, (one_call_each, (blocks - exact).abs().max())


def test_chebyshev_series_remainder_is_within_its_bound():
    """The expansion the blocks rely on, checked numerically in float64 against e^{-ixv} itself."""
    from longctx_hf.remote import longctx_rope_blocks as blocks

    x = torch.tensor([1e-6, 1e-3, 0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    v = torch.linspace(-1, 1, 201, dtype=torch.float64)[:, None]
    bessel = blocks.bessel_j(12, x)
    assert torch.allclose(bessel[0], torch.special.bessel_j0(x), atol=1e-15)
    assert torch.allclose(bessel[1], torch.special.bessel_j1(x), atol=1e-15)
    for r in range(1, 11):  # the recurrence J_{r-1} + J_{r+1} = (2 r / x) J_r
        assert torch.allclose(bessel[r - 1] + bessel[r + 1], 2 * r / x * bessel[r], rtol=1e-12, atol=1e-300)
    exact = torch.polar(torch.ones_like(v * x), -v * x)
    for tolerance in (2.0 ** -24, 2.0 ** -11, 2.0 ** -8):
        terms = blocks.terms_needed(x, tolerance)
        for k in range(len(x)):
            chebyshev, previous, total = v, torch.ones_like(v), bessel[0, k] * torch.ones_like(v)
            for r in range(1, int(terms[k])):
                total = total + 2 * (-1j) ** r * bessel[r, k] * chebyshev
                previous, chebyshev = chebyshev, 2 * v * chebyshev - previous
            assert (total[:, 0] - exact[:, k]).abs().max().item() <= tolerance
        assert bool((terms[1:] >= terms[:-1]).all()) and int(terms[-1]) > int(terms[0])


def test_decoding_after_inference_mode_and_with_gradients_through_several_steps():
    """The reused buffer for rotated keys must neither leak an inference tensor into later decoding nor be
    overwritten while autograd still holds the keys of an earlier step."""
    model = extended("llama", "dynamic_ntk")
    ids = torch.randint(0, 128, (1, 2 * L), generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        first, _ = generate(model, ids, new=3)
    second, _ = generate(model, ids, new=3)
    assert torch.equal(first, second)
    with torch.no_grad():
        cache = _compat.output_cache(model(ids, use_cache=True))
    total = 0
    for token in (ids[:, -1:], ids[:, -2:-1]):  # two steps with gradients, one backward through both
        out = model(token, **{_compat.cache_keyword(model): cache}, use_cache=True)
        cache, total = _compat.output_cache(out), total + out.logits.sum()
    total.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
