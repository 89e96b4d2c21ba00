"""SelfExtend: the paper's definition (checked against an O(n^2) reference written from it), the unextended model
inside the window, cache-exact decoding, padding, refusals, and reloading in fresh processes.

Tiny models pretrained to L = 64 tokens, neighbour window W = 16, group size G = 6 (not dividing W): reach
G * (L - W + W // G) = 300 tokens.
"""
import json

import pytest
import torch
from fresh_process import run_json
from models import tiny_model
from test_dynamic_cache import generate, recompute

from longctx_hf import _compat, extend_context, from_pretrained, methods
from longctx_hf.checkpoint import extend_checkpoint
from longctx_hf.methods import self_extend
from longctx_hf.remote import longctx_self_extend as runtime

L, W, G = 64, 16, 6
TOL = 1e-5
# llama: halves; mistral (no sliding window); gpt_neox: partial rotary (25%); cohere: interleaved pairs
KINDS = ["llama", "mistral", "gpt_neox", "cohere"]


def tiny(kind="llama", seed=0, **overrides):
    return tiny_model(kind, seed=seed, **{"max_position_embeddings": L, **overrides})


def extended(kind="llama", seed=0, **options):
    return extend_context(tiny(kind, seed), "self_extend", 4, **{"window": W, "group_size": G, **options})


def runtimes(model):
    return {id(r): r for m in model.modules() for r in [getattr(m, runtime.RUNTIME_ATTRIBUTE, None)] if r}.values()


def reference_attention(group_size, window, inv_freq, interleaved):
    """The definition, literally: for every pair (i, j <= i) rotate q_i by its SelfExtend distance and dot it with
    the unrotated k_j (RoPE scores depend on the distance only); n x n x head_dim memory, for tiny inputs."""

    def attention(module, q, k, v, mask, scaling=None, **kwargs):
        n = q.shape[-2]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        distance = torch.tensor([[self_extend.grouped_distance(a, b, group_size, window) if b <= a else 0
                                  for b in range(n)] for a in range(n)])
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        angles = distance[..., None].double() * inv_freq.double()  # (n, n, half)
        cos, sin = angles.cos(), angles.sin()
        half = inv_freq.numel()
        if interleaved:
            q1, q2, k1, k2 = q[..., 0:2 * half:2], q[..., 1:2 * half:2], k[..., 0:2 * half:2], k[..., 1:2 * half:2]
        else:
            q1, q2, k1, k2 = q[..., :half], q[..., half:2 * half], k[..., :half], k[..., half:2 * half]
        q1, q2 = q1.double()[:, :, :, None], q2.double()[:, :, :, None]  # (b, h, n, 1, half)
        rotated1, rotated2 = q1 * cos - q2 * sin, q2 * cos + q1 * sin  # q_i rotated by distance(i, j)
        scores = (rotated1 * k1.double()[:, :, None]).sum(-1) + (rotated2 * k2.double()[:, :, None]).sum(-1)
        scores = scores + (q[..., 2 * half:].double() @ k[..., 2 * half:].double().transpose(-1, -2))  # not rotated
        scores = (scores * scaling).masked_fill(j > i, -torch.inf)
        return (scores.softmax(-1) @ v.double()).to(q.dtype).transpose(1, 2), None

    return attention


class Reference:
    def __init__(self, attention):
        self.attention = attention


@pytest.mark.parametrize("kind,block", [("llama", 48), ("mistral", 48), ("gpt_neox", 48), ("cohere", 48),
                                        ("llama", 5)])
def test_logits_match_the_papers_definition(kind, block, monkeypatch):
    model = extended(kind)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(runtime, "QUERY_BLOCK", block)  # blocks of W = 16 queries, or of 5 (< W, not dividing 200)
    with torch.no_grad():
        fast = model(ids).logits
        (live,) = runtimes(model)
        live.force_math = True
        explicit = model(ids).logits
        reference = Reference(reference_attention(G, W, live.inv_freq, live.interleaved))
        for module in model.modules():
            if hasattr(module, runtime.RUNTIME_ATTRIBUTE):
                setattr(module, runtime.RUNTIME_ATTRIBUTE, reference)
        expected = model(ids).logits
    error = (fast - expected).abs().max().item()
    assert error <= TOL and (explicit - expected).abs().max().item() <= TOL
    # and SelfExtend is not plain RoPE here: the unextended model is far from the reference by comparison
    with torch.no_grad():
        assert (tiny(kind)(ids).logits - expected).abs().max().item() > 100 * max(error, 1e-7)


def test_grouped_distances_stay_inside_the_pretrained_range():
    spec = self_extend.Spec(factor=4, rope_theta=1e4, rotary_dim=16, original_max_position_embeddings=L,
                            window=W, group_size=G)
    n = spec.extended_length
    assert max(self_extend.grouped_distance(i, 0, G, W) for i in range(n)) <= L - 1  # trained: 0 .. L - 1
    for group_size, window in ((5, 16), (6, 16), (4, 16), (3, 10)):  # the reach is exact, dividing or not
        n = self_extend.reach(L, group_size, window)
        assert self_extend.grouped_distance(n - 1, 0, group_size, window) == L - 1
        assert self_extend.grouped_distance(n, 0, group_size, window) == L
    assert all(self_extend.grouped_distance(i, j, G, W) == i - j for i in range(n) for j in range(max(0, i - W + 1), i))


def test_inside_the_window_it_is_exactly_the_unextended_model():
    plain = tiny(max_position_embeddings=256)
    model = extend_context(tiny(max_position_embeddings=256), "self_extend", 2, window=128, group_size=4)
    ids = torch.randint(1, 128, (2, 128), generator=torch.Generator().manual_seed(1))  # 0 is the pad id
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    sequences, logits = generate(model, ids[:, :60], new=60)
    expected_sequences, expected = generate(plain, ids[:, :60], new=60)
    assert torch.equal(sequences, expected_sequences) and torch.equal(logits, expected)


def test_eager_models_stay_eager_and_exact():
    plain = tiny(max_position_embeddings=256, attn_implementation="eager")
    model = extend_context(tiny(max_position_embeddings=256, attn_implementation="eager"), "self_extend", 2,
                           window=128, group_size=4)
    ids = torch.randint(1, 128, (2, 128), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :30] = 0  # a left-padded row
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)  # within W: eager, causal, bit for bit
        assert torch.equal(model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
        long_ids = torch.randint(1, 128, (1, 400), generator=torch.Generator().manual_seed(2))
        sdpa = extend_context(tiny(max_position_embeddings=256), "self_extend", 2, window=128, group_size=4)
        assert (model(long_ids).logits - sdpa(long_ids).logits).abs().max().item() <= TOL
    extend_context(model, "self_extend", 2, window=128, group_size=4)  # re-extending keeps eager
    assert runtime.current_base(model) == "eager"
    extend_context(model, "yarn", 2)
    assert model.config._attn_implementation == "eager"


def test_activating_twice_leaves_one_hook_and_yarn_after_it_runs():
    model = extended()
    runtime.activate(model)
    runtime.activate(model)
    attention = [m for m in model.modules() if type(m).__name__ == "LlamaAttention"]
    assert len(attention) == 2 and all(len(m._forward_pre_hooks) == 1 for m in attention)
    assert not any(len(m._forward_pre_hooks) for m in model.modules() if m not in attention)
    extend_context(model, "yarn", 4)
    assert not any(len(m._forward_pre_hooks) for m in model.modules())
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))  # no stale SelfExtend hook complains


@pytest.mark.parametrize("kind", ["llama", "cohere"])
def test_cached_generate_equals_recompute(kind):
    model = extended(kind)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    sequences, logits = generate(model, ids, new=120)
    assert sequences.shape[1] == 160 > 2 * L
    assert (logits[0] - recompute(model, sequences[0], 40)).abs().max().item() <= 1e-4


def test_prefill_in_chunks_with_a_cache_equals_one_forward():
    model = extended()
    ids = torch.randint(0, 128, (1, 230), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :90], use_cache=True)
        second = model(ids[:, 90:], **{_compat.cache_keyword(model): _compat.output_cache(first)}, use_cache=True)
    chunked = torch.cat([first.logits, second.logits], dim=1)
    assert (chunked - full).abs().max().item() <= 1e-5


def test_left_padded_batch_each_row_equals_its_own_recompute():
    model = extended()
    rows = [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (30, 50)]
    ids = torch.zeros(2, 50, dtype=torch.long)
    mask = torch.zeros(2, 50, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, 50 - len(row):], mask[b, 50 - len(row):] = row, 1
    sequences, logits = generate(model, ids, attention_mask=mask, new=100)
    for b, row in enumerate(rows):
        alone = torch.cat([row, sequences[b, 50:]])
        error = (logits[b] - recompute(model, alone, len(row))).abs().max().item()
        assert error <= 1e-4, (b, error)


def test_default_group_size_and_window_follow_the_documented_rule():
    spec = self_extend.Spec(factor=2, rope_theta=1e5, rotary_dim=64, original_max_position_embeddings=8192)
    assert (spec.window, spec.group_size) == (2048, 3)  # W = L // 4; smallest G with G (L - W + W // G) >= 16384
    assert self_extend.reach(8192, 3, 2048) >= 16384 > self_extend.reach(8192, 2, 2048)
    spec = self_extend.Spec(factor=4, rope_theta=1e5, rotary_dim=64, original_max_position_embeddings=8192,
                            window=1024)
    assert spec.group_size == 5 and self_extend.reach(8192, 5, 1024) >= 32768 > self_extend.reach(8192, 4, 1024)
    model = extend_context(tiny(), "self_extend", target_length=256)
    record = model.config.to_dict()["longctx_hf"]
    # 5 * (64 - 16 + 3) = 255 < 256 (the paper's (L - W) * G + W = 256 counts one untrained distance)
    assert record["options"] == {"group_size": 6, "window": 16} and model.config.max_position_embeddings == 256


@pytest.mark.parametrize("options,error,match", [
    ({"group_size": 2}, ValueError, "reach .* less than the target 256"),
    ({"window": 64}, ValueError, "window must be smaller than the pretrained length 64"),
    ({"window": 0}, ValueError, "window must be an int >= 1"),
    ({"group_size": 1}, ValueError, "group_size must be an int >= 2"),
    ({"group_size": 2.5}, TypeError, "group_size must be an int"),
    ({"window_size": 8}, ValueError, "did you mean 'window'"),
])
def test_bad_options_are_refused_before_the_model_changes(options, error, match):
    model = tiny()
    before = model.config.to_dict()
    with pytest.raises(error, match=match):
        extend_context(model, "self_extend", 4, **options)
    assert model.config.to_dict() == before and model.config._attn_implementation == "sdpa"


def test_refuses_what_its_attention_does_not_implement():
    model = tiny("gemma2")
    with pytest.raises(ValueError, match="attn_logit_softcapping=50"):
        extend_context(model, "self_extend", 4)
    model = tiny()
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        extend_context(model, "self_extend", 4)
    assert model.config.rope_parameters["rope_type"] == "default"


def test_refuses_static_cache_and_a_later_attention_switch():
    model = extended()
    with pytest.raises(ValueError, match="DynamicCache"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2, cache_implementation="static",
                       pad_token_id=0)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="without positions"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_gradients_flow_and_match_the_inference_path():
    model = extended()
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
    model.train()
    logits = model(ids).logits  # autograd: the explicit path (the flash kernel's log-sum-exp has no gradient)
    assert (logits - expected).abs().max().item() <= TOL
    logits[0, -1].sum().backward()
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_reextending_replaces_self_extend_and_back():
    model = extend_context(extended(), "yarn", 4)
    fresh = extend_context(tiny(), "yarn", 4)
    config = model.config.to_dict()
    assert model.config._attn_implementation == "sdpa" and "auto_map" not in config
    assert "attn_implementation" not in config and not list(runtimes(model))
    ids = torch.randint(0, 128, (1, 200))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
        extend_context(model, "self_extend", 4, window=W, group_size=G)
        assert torch.allclose(model(ids).logits, extended()(ids).logits, atol=1e-6)


# ------------------------------------------------------------------------------------------------ reloading
PLAIN_RELOAD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
try:
    AutoModelForCausalLM.from_pretrained(folder)(torch.zeros(1, 4, dtype=torch.long))
    plain_error = None
except Exception as err:
    plain_error = f"{type(err).__name__}: {err}"
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
data = torch.load(folder + "/expected.pt")
with torch.no_grad():
    logits = model(data["ids"]).logits
out = model.generate(data["ids"][:, :40], max_new_tokens=80, min_new_tokens=80, do_sample=False,
                     output_logits=True, return_dict_in_generate=True, pad_token_id=0)
with torch.no_grad():
    full = model(out.sequences).logits[0, 39:-1]
print(json.dumps({"plain_error": plain_error, "attention": model.config._attn_implementation,
                  "equal": torch.equal(logits, data["logits"]),
                  "cache_error": (torch.stack(out.logits, 1)[0] - full).abs().max().item()}))
"""

LONGCTX_RELOAD = r"""
import json, sys, torch
import longctx_hf
folder = sys.argv[1]
data = torch.load(folder + "/expected.pt")
equal = []
for trust in (False, True):  # with trust_remote_code the shipped code activates it; from_pretrained does not again
    model = longctx_hf.from_pretrained(folder, trust_remote_code=trust)
    with torch.no_grad():
        equal.append(torch.equal(model(data["ids"]).logits, data["logits"]))
print(json.dumps({"equal": equal, "attention": model.config._attn_implementation,
                  "info": longctx_hf.context_info(model).method}))
"""


def test_reload_in_fresh_processes_and_the_offline_rewriter(tmp_path):
    model = extended()
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(ids).logits
    folder = tmp_path / "extended"
    model.save_pretrained(folder)
    torch.save({"ids": ids, "logits": logits}, folder / "expected.pt")
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "longctx_self_extend.SelfExtendForCausalLM"}
    assert config["attn_implementation"] == "longctx_self_extend"
    for name, source in methods.remote_code_files(self_extend).items():
        assert (folder / name).read_text() == source

    # the offline rewriter writes the same config and code from the unextended checkpoint
    tiny().save_pretrained(tmp_path / "plain")
    extend_checkpoint(tmp_path / "plain", tmp_path / "offline", "self_extend", 4, window=W, group_size=G)
    assert json.loads((tmp_path / "offline" / "config.json").read_text()) == config
    for name in self_extend.REMOTE_FILES:
        assert (tmp_path / "offline" / name).read_text() == (folder / name).read_text()

    plain = run_json(PLAIN_RELOAD, folder, cwd=tmp_path)
    assert plain["plain_error"] is not None  # never silently plain RoPE
    assert plain["attention"] == "longctx_self_extend" and plain["equal"] and plain["cache_error"] <= 1e-4
    exact = run_json(LONGCTX_RELOAD, folder, cwd=tmp_path, with_longctx_hf=True)
    assert exact == {"equal": [True, True], "attention": "longctx_self_extend", "info": "self_extend"}


def test_a_saved_config_with_bad_values_fails_on_load(tmp_path):
    extended().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"]["window"] = config["rope_scaling"]["window"] = L
    (tmp_path / "config.json").write_text(json.dumps(config))
    from transformers import AutoConfig

    with pytest.raises(Exception, match="'window'\\] must be smaller"):
        AutoConfig.from_pretrained(tmp_path)


def test_listed_as_a_method():
    assert methods.get_method("selfextend") is self_extend
    assert "group_size" in self_extend.Spec.option_names() and "window" in self_extend.Spec.option_names()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_plain_load_naming_another_attention_fails_loudly(tmp_path, attention):
    """In a process where SelfExtend is registered, a plain load that names sdpa/eager would run plain RoPE."""
    from transformers import AutoModelForCausalLM

    extended().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="silently run plain RoPE"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attention)
    assert runtime.is_active(from_pretrained(tmp_path, attn_implementation=attention))


@pytest.mark.parametrize("method", ["self_extend", "dynamic_yarn", "alibi"])
def test_only_the_main_process_writes_the_shipped_code(tmp_path, method):
    """One save hook for every runtime: atomic, and silent in processes that do not write the checkpoint."""
    model = extend_context(tiny(), method, **({} if method == "alibi" else {"factor": 4}))
    model.save_pretrained(tmp_path / "worker", is_main_process=False)
    assert not list((tmp_path / "worker").glob("*.py"))
    model.save_pretrained(tmp_path / "main")
    shipped = sorted(p.name for p in (tmp_path / "main").glob("*.py"))
    assert shipped == sorted(methods.remote_code_files(methods.get_method(method))) and "longctx_compat.py" in shipped
    assert not list((tmp_path / "main").glob(".tmp-*"))
