"""Prompt log-probabilities of one checkpoint in plain transformers: the reference every engine is compared with.

Never imports longctx_hf: this is what a user gets with `from_pretrained` (with trust_remote_code=True for the
checkpoints that ship their modeling code).

    python run_transformers.py CHECKPOINT TOKENS.json OUT.json
"""
import json
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

CHUNK = 1024  # rows of the vocabulary projection at a time: never a full (tokens x vocab) matrix


@torch.no_grad()
def prompt_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, from one forward of the decoder and a chunked output projection."""
    hidden = model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0, :-1]
    head = model.get_output_embeddings()
    targets = torch.tensor(ids[1:])
    out = []
    for start in range(0, len(targets), CHUNK):
        logits = head(hidden[start:start + CHUNK]).float()
        out.append(torch.log_softmax(logits, -1).gather(-1, targets[start:start + CHUNK, None])[:, 0])
    return torch.cat(out).tolist()


def main(checkpoint, tokens_file, out_file):
    ids = json.loads(open(tokens_file).read())
    config = AutoConfig.from_pretrained(checkpoint)
    remote = bool(getattr(config, "auto_map", None))
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, trust_remote_code=remote).eval()
    result = {"engine": "transformers", "loaded": True, "trust_remote_code": remote,
              "max_length": config.max_position_embeddings, "logprobs": prompt_logprobs(model, ids)}
    result["seconds"] = time.perf_counter() - started
    open(out_file, "w").write(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
