import torch
from tokenizers import Tokenizer, decoders
from tokenizers import models as tokenizer_models
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=256, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def tiny_model(model_type="llama", seed=0, **overrides):
    config = AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def char_tokenizer():
    """A real fast tokenizer, one token per printable ASCII character (fits the tiny models' 128-token vocab)."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    backend = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
