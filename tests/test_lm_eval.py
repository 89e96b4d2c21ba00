"""Extended checkpoints in lm-evaluation-harness (`lm_eval --model hf`), on a local task file: its per-sample
log-likelihoods equal the ones a fresh process without longctx_hf computes, for a static checkpoint and for one
that needs trust_remote_code (the child never imports longctx_hf); and a dynamic checkpoint needs `max_length`,
because lm_eval truncates every input to config.max_position_embeddings, which dynamic scaling leaves at the
pretrained length."""
import json
import os
import random
import subprocess
import sys

import pytest
from fresh_process import run_json
from models import char_tokenizer, tiny_model

from longctx_hf import extend_context

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'longctx-hf[harness]')")

TASK = """task: longctx_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""

REFERENCE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, docs = sys.argv[1], [json.loads(line) for line in open(sys.argv[2])]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
out = []
for doc in docs:
    context, target = tokenizer(doc["context"]).input_ids, tokenizer(doc["continuation"]).input_ids
    with torch.no_grad():
        logp = model(torch.tensor([context + target])).logits[0, len(context) - 1:-1].log_softmax(-1)
    out.append(logp.gather(-1, torch.tensor(target)[:, None]).sum().item())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def harness_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w") as out:  # contexts of ~330 tokens: past the tiny models' 256
        for _ in range(3):
            words = " ".join(rng.choice(["alpha", "beta", "gamma", "key", "is"]) for _ in range(70))
            out.write(json.dumps({"context": words, "continuation": " the key is 42"}) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / "longctx_local.yaml").write_text(TASK.format(data=root / "docs.jsonl"))
    for method in ("yarn", "dynamic_yarn"):
        model = tiny_model("llama")
        extend_context(model, method, factor=2)
        model.save_pretrained(root / method)
        tokenizer = char_tokenizer()
        tokenizer.eos_token = "<unk>"  # lm_eval needs an EOS/BOS to prefix an empty context
        tokenizer.save_pretrained(root / method)
    return root


def _lm_eval(root, model_args):
    out = root / f"out-{abs(hash(model_args))}"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
                           "--tasks", "longctx_local", "--include_path", str(root / "tasks"), "--device", "cpu",
                           "--batch_size", "1", "--output_path", str(out), "--log_samples"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = [json.loads(line) for path in out.rglob("samples_longctx_local_*.jsonl") for line in open(path)]
    return [float(s["filtered_resps"][0][0]) for s in sorted(samples, key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("method, model_args", [
    ("yarn", "dtype=float32"),
    ("dynamic_yarn", "trust_remote_code=True,dtype=float32,max_length=512"),
])
def test_lm_eval_scores_what_a_plain_transformers_process_scores(harness_setup, method, model_args):
    folder = harness_setup / method
    harness = _lm_eval(harness_setup, f"pretrained={folder},{model_args}")
    reference = run_json(REFERENCE, folder, harness_setup / "docs.jsonl", cwd=harness_setup)
    assert len(harness) == 3 and harness == pytest.approx(reference, abs=1e-4)


def test_lm_eval_truncates_a_dynamic_checkpoint_without_max_length(harness_setup):
    folder = harness_setup / "dynamic_yarn"
    config = json.loads((folder / "config.json").read_text())
    assert config["max_position_embeddings"] == 256  # dynamic scaling keeps the pretrained length
    truncated = _lm_eval(harness_setup, f"pretrained={folder},trust_remote_code=True,dtype=float32")
    reference = run_json(REFERENCE, folder, harness_setup / "docs.jsonl", cwd=harness_setup)
    assert all(abs(a - b) > 1e-3 for a, b in zip(truncated, reference))
