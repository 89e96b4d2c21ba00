import torch
from transformers import AutoConfig, AutoModelForCausalLM

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=256, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def tiny_model(model_type="llama", seed=0, **overrides):
    config = AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()

