"""ALiBi: slopes from the paper, exact against a hand-written forward, every attention path, padding, cache,
generate, fresh-process reload (with and without trust_remote_code), refusals."""
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from fresh_process import run_python
from models import tiny_model

from longctx_hf import _compat, alibi_model_from_config, context_info, extend_context
from longctx_hf.methods import alibi

GQA = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)  # head_dim 16, 6 heads: not a power of 2


def paper_slopes(n):
    """Written out independently: start = 2^(-2^-(log2(n)-3)), ratio = start (Press et al., reference code)."""
    def power_of_two(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_two(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


def test_slopes_match_the_paper():
    assert alibi.slopes(8) == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    sixteen = [2 ** (-h / 2) for h in range(1, 17)]
    assert alibi.slopes(16) == pytest.approx(sixteen, rel=1e-15)
    # 12 heads: the 8-head series, then every other slope of the 16-head series (2^-0.5, 2^-1.5, ...)
    assert alibi.slopes(12) == pytest.approx([2 ** -h for h in range(1, 9)] + sixteen[0::2][:4], rel=1e-15)
    assert alibi.slopes(6) == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3], rel=1e-15)
    for n in (1, 2, 3, 5, 6, 7, 12, 20, 24, 32, 40, 64, 96):
        assert alibi.slopes(n) == pytest.approx(paper_slopes(n), rel=1e-12), n


def reference_logits(model, ids):
    """A plain ALiBi LLaMA forward from the model's own weights: loops over heads, no transformers code."""
    cfg, inner = model.config, model.model
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    n = ids.shape[1]
    slopes = paper_slopes(heads)

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    x = inner.embed_tokens.weight[ids[0]].double()
    distance = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # i - j
    for layer in inner.layers:
        attn, h = layer.self_attn, rms(x, layer.input_layernorm.weight.double())
        q = h @ attn.q_proj.weight.double().T
        k = h @ attn.k_proj.weight.double().T
        v = h @ attn.v_proj.weight.double().T
        outputs = []
        for head in range(heads):
            kv = head // (heads // kv_heads)
            qh, kh, vh = q[:, head * d:(head + 1) * d], k[:, kv * d:(kv + 1) * d], v[:, kv * d:(kv + 1) * d]
            scores = qh @ kh.T / math.sqrt(d) - slopes[head] * distance
            scores = scores.masked_fill(distance < 0, float("-inf"))
            outputs.append(torch.softmax(scores, -1) @ vh)
        x = x + torch.cat(outputs, -1) @ attn.o_proj.weight.double().T
        mlp, h = layer.mlp, rms(x, layer.post_attention_layernorm.weight.double())
        gate = h @ mlp.gate_proj.weight.double().T
        x = x + (torch.nn.functional.silu(gate) * (h @ mlp.up_proj.weight.double().T)) @ mlp.down_proj.weight.double().T
    return rms(x, inner.norm.weight.double()) @ model.lm_head.weight.double().T


@pytest.fixture(scope="module")
def gqa_alibi():
    return extend_context(tiny_model("llama", **GQA), "alibi", max_length=4096)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_every_attention_path_equals_hand_written_alibi(gqa_alibi, attn):
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(1))
    gqa_alibi.set_attn_implementation(attn)  # a standard name keeps ALiBi
    assert gqa_alibi.config._attn_implementation == f"alibi_{attn}"
    want = reference_logits(gqa_alibi, ids)
    got = logits(gqa_alibi, ids)[0].double()
    assert (got - want).abs().max() < 2e-5
    plain = logits(tiny_model("llama", **GQA), ids)[0].double()  # the same weights with RoPE differ clearly
    assert (plain - want).abs().max() > 1e-2
    gqa_alibi.set_attn_implementation("sdpa")


def test_rotary_is_off_and_config_says_alibi(gqa_alibi):
    rotary = gqa_alibi.model.rotary_emb
    x = torch.zeros(1, 5, 16)
    cos, sin = rotary(x, torch.arange(5)[None])
    assert torch.equal(cos, torch.ones_like(cos)) and torch.equal(sin, torch.zeros_like(sin))
    config = gqa_alibi.config.to_dict()
    assert config["rope_parameters"]["rope_type"] == "alibi" and config["max_position_embeddings"] == 4096
    assert config["auto_map"] == {"AutoModelForCausalLM": "alibi_modeling.AlibiForCausalLM"}
    info = context_info(gqa_alibi)
    assert info.method == "alibi" and info.extended_length == 4096 and not info.loads_with_plain_transformers


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded(gqa_alibi, attn, side):
    gqa_alibi.set_attn_implementation(attn)
    generator = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, 128, (n,), generator=generator) for n in (30, 21, 9)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[b, span], mask[b, span] = row, 1
    padded = logits(gqa_alibi, ids, attention_mask=mask)
    for b, row in enumerate(rows):
        alone = logits(gqa_alibi, row[None])[0]
        real = padded[b][mask[b].bool()]
        assert (real - alone).abs().max() < 2e-5, (side, attn, b)
    gqa_alibi.set_attn_implementation("sdpa")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_decoding_equals_recompute(gqa_alibi, attn):
    gqa_alibi.set_attn_implementation(attn)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    full = logits(gqa_alibi, ids)
    with torch.no_grad():
        out = gqa_alibi(ids[:, :25], use_cache=True)
        steps, cache = [out.logits], _compat.output_cache(out)
        keyword = _compat.cache_keyword(gqa_alibi)
        for t in range(25, 32):  # one token at a time
            out = gqa_alibi(ids[:, t:t + 1], **{keyword: cache}, use_cache=True)
            steps.append(out.logits)
        steps.append(gqa_alibi(ids[:, 32:], **{keyword: cache}, use_cache=True).logits)  # a chunk of 8
    assert (torch.cat(steps, 1) - full).abs().max() < 2e-5
    gqa_alibi.set_attn_implementation("sdpa")


def test_batched_generate_matches_single(gqa_alibi):
    rows = [torch.tensor([5, 17, 33, 2, 9, 71]), torch.tensor([40, 3, 8])]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = rows[0], 1
    ids[1, 3:], mask[1, 3:] = rows[1], 1  # left padding, as for generation
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    batch = gqa_alibi.generate(ids, attention_mask=mask, **settings)
    for b, row in enumerate(rows):
        alone = gqa_alibi.generate(row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), **settings)
        assert torch.equal(batch[b, -8:], alone[0, -8:])


CHILD_WITHOUT_LONGCTX = r"""
import sys
import torch
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
data = torch.load(folder + "/expected.pt")
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
model.set_attn_implementation("eager")  # a later switch keeps ALiBi
with torch.no_grad():
    eager = model(data["ids"]).logits
model.set_attn_implementation("sdpa")
with torch.no_grad():
    sdpa = model(data["ids"]).logits
assert not any(name.startswith("longctx_hf") for name in sys.modules)
print(torch.equal(sdpa, data["logits"]), (eager - data["logits"]).abs().max().item())
"""

CHILD_WITH_LONGCTX = r"""
import sys
import longctx_hf
import torch
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
data = torch.load(folder + "/expected.pt")
model = longctx_hf.from_pretrained(folder).eval()
with torch.no_grad():
    print(torch.equal(model(data["ids"]).logits, data["logits"]), model.config._attn_implementation)
# once longctx_hf has registered rope_type 'alibi', a plain load gives ALiBi (where transformers honours the saved
# attn_implementation) or fails loudly; one naming plain attention always fails: never a model without positions
for attention in (None, "sdpa", "eager"):
    kwargs = {} if attention is None else {"attn_implementation": attention}
    try:
        plain = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except ValueError as err:
        assert "without any position" in str(err), err
    else:
        assert attention is None and plain.config._attn_implementation.startswith("alibi_"), kwargs
print("refused")
"""

CHILD_PLAIN = r"""
import sys
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1])
"""


def test_reload_in_fresh_processes(tmp_path):
    model = extend_context(tiny_model("mistral", **GQA), "alibi")
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(4))
    folder = tmp_path / "alibi"
    model.save_pretrained(folder)
    torch.save({"ids": ids, "logits": logits(model, ids)}, folder / "expected.pt")
    for name in ("alibi_modeling.py", "longctx_compat.py"):  # one self-contained set: torch + transformers only
        source = (folder / name).read_text()
        assert "import longctx_hf" not in source and "from longctx_hf" not in source
        assert set(re.findall(r"^from \.(\w*) import", source, re.M)) <= {"", "longctx_compat"}
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith(
        "alibi_modeling.")

    out = run_python(CHILD_WITHOUT_LONGCTX, folder, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    same, eager_error = out.stdout.split()[-2:]
    assert same == "True" and float(eager_error) < 2e-5

    out = run_python(CHILD_WITH_LONGCTX, folder, cwd=tmp_path, with_longctx_hf=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["True", "alibi_sdpa", "refused"]

    out = run_python(CHILD_PLAIN, folder, cwd=tmp_path)  # neither: a loud failure, never a silent RoPE model
    assert out.returncode != 0 and "alibi" in out.stderr


def test_from_config_builder_trains_and_saves(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = alibi_model_from_config(config, max_length=1024)
    assert model.config._attn_implementation == "alibi_sdpa" and model.config.max_position_embeddings == 1024
    model.train()
    ids = torch.randint(0, 64, (2, 16))
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.eval()
    assert (logits(model, ids)[0].double() - reference_logits(model, ids[:1])).abs().max() < 2e-5


@pytest.mark.parametrize("call,error,words", [
    (lambda m: extend_context(m, "alibi", 2), ValueError, "factor/target_length are not used"),
    (lambda m: extend_context(m, "alibi", target_length=1024), ValueError, "max_length"),
    (lambda m: extend_context(m, "alibi", max_lenght=1024), ValueError, "did you mean 'max_length'"),
    (lambda m: extend_context(m, "alibi", max_length=0), ValueError, "max_length must be a positive int"),
    (lambda m: extend_context(m, "alibi", max_length=2.5), TypeError, "max_length must be an int"),
])
def test_bad_input_leaves_model_untouched(call, error, words):
    model = tiny_model("llama")
    before = (model.config.to_dict(), model.config._attn_implementation, model.model.rotary_emb.inv_freq.clone())
    with pytest.raises(error, match=words):
        call(model)
    assert model.config.to_dict() == before[0] and model.config._attn_implementation == before[1]
    assert torch.equal(model.model.rotary_emb.inv_freq, before[2]) and "save_pretrained" not in vars(model)


def test_refuses_models_it_cannot_make_alibi():
    with pytest.raises(ValueError, match="no rotary embedding"):
        extend_context(tiny_model("gpt2", n_embd=64, n_layer=1, n_head=4), "alibi")
    gemma2 = tiny_model("gemma2", head_dim=16)
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        extend_context(gemma2, "alibi")
    assert gemma2.config.rope_parameters["rope_type"] == "default"
    model = extend_context(tiny_model("llama"), "alibi")
    with pytest.raises(ValueError, match="uses ALiBi"):
        extend_context(model, "yarn", 2)
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        model.set_attn_implementation("flash_attention_3")


def test_offline_extend_writes_the_same_alibi_checkpoint(tmp_path):
    """`longctx-hf extend --method alibi` (no weights loaded) gives the in-memory path's config and modeling file,
    and a process where longctx_hf is not importable reloads it to the same logits."""
    from longctx_hf import extend_checkpoint

    base = tiny_model("mistral", **GQA)
    base.save_pretrained(tmp_path / "src")
    extend_checkpoint(tmp_path / "src", tmp_path / "offline", "alibi", max_length=2048)
    model = extend_context(base, "alibi", max_length=2048)
    model.save_pretrained(tmp_path / "memory")
    for name in ("config.json", "alibi_modeling.py", "longctx_compat.py"):
        assert (tmp_path / "offline" / name).read_bytes() == (tmp_path / "memory" / name).read_bytes(), name
    assert json.loads((tmp_path / "offline" / "config.json").read_text())["max_position_embeddings"] == 2048

    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    torch.save({"ids": ids, "logits": logits(model, ids)}, tmp_path / "offline" / "expected.pt")
    out = run_python(CHILD_WITHOUT_LONGCTX, tmp_path / "offline", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2] == "True"


def test_importing_longctx_hf_changes_nothing_in_transformers():
    """No import-time hooks: transformers stays as it is until the user extends or loads a model through us."""
    code = ("import sys, longctx_hf; assert 'torch' not in sys.modules; "
            "assert not [f for f in sys.meta_path if type(f).__module__.startswith('longctx_hf')]; "
            "import transformers; from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS; "
            "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS; "
            "print(sorted({'alibi', 'dynamic_yarn', 'self_extend'} & set(ROPE_INIT_FUNCTIONS)), "
            "[n for n in ALL_ATTENTION_FUNCTIONS.valid_keys() if 'alibi' in n or 'longctx' in n])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "[]"]

def test_alibi_replaces_a_dynamic_yarn_extension(gqa_alibi):
    """Re-extending replaces: a dynamic_yarn model (cache-exact runtime installed) turned into ALiBi equals the
    same weights made ALiBi directly."""
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(6))
    model = extend_context(tiny_model("mistral", **GQA), "dynamic_yarn", 2)
    extend_context(model, "alibi")
    assert model.config._attn_implementation == "alibi_sdpa"
    assert torch.equal(logits(model, ids), logits(gqa_alibi, ids))
