"""Extend SmolLM2-135M (trained to 8192 tokens) with YaRN x2, save, reload with plain transformers, and
retrieve a pass key at ~12k tokens, where the unextended model fails.

    python examples/passkey_smollm2.py            # ~3 minutes on a 2-core CPU
"""
import subprocess
import sys
import tempfile

from transformers import AutoModelForCausalLM, AutoTokenizer

from longctx_hf import context_info, extend_context
from longctx_hf.evaluate import passkey_trial
from longctx_hf.real_model import smollm2_path

LENGTH = 12000

RELOAD_AND_ASK = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
sys.path.insert(0, sys.argv[2])  # only the passkey prompt helper; the model is loaded by plain transformers
from passkey import passkey_trial
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print("reloaded:", model.config.rope_parameters)
print("extended, reloaded in a fresh process:", passkey_trial(model, tok, int(sys.argv[3]), seed=1))
"""


def main():
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    print("unextended:", passkey_trial(model, tokenizer, LENGTH, seed=1))
    extend_context(model, "yarn", factor=2)
    print(context_info(model))
    out = tempfile.mkdtemp(prefix="smollm2-yarn2-")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    helper_dir = __import__("longctx_hf.evaluate.passkey", fromlist=["x"]).__file__.rsplit("/", 1)[0]
    subprocess.run([sys.executable, "-c", RELOAD_AND_ASK, out, helper_dir, str(LENGTH)], check=True)


if __name__ == "__main__":
    main()
