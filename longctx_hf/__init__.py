"""longctx_hf: extend the context window of HuggingFace Transformers models, exactly and portably."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["extend_context", "context_info", "from_pretrained", "ContextInfo", "METHODS", "extend_checkpoint",
           "push_to_hub", "alibi_model_from_config", "finetune",
           "FinetuneOptions", "evaluate_model", "search_rope_factors"]


def __getattr__(name):
    # Lazy so that config-only entry points (`longctx-hf info`) never import torch or transformers.
    if name in ("extend_context", "context_info", "from_pretrained", "alibi_model_from_config"):
        from . import patch

        return getattr(patch, name)
    if name == "extend_checkpoint":
        from .checkpoint import extend_checkpoint

        return extend_checkpoint
    if name == "push_to_hub":
        from .hub import push_to_hub

        return push_to_hub
    if name == "ContextInfo":
        from .hf_config import ContextInfo

        return ContextInfo
    if name in ("finetune", "FinetuneOptions"):
        from . import train

        return getattr(train, name)
    if name == "evaluate_model":
        from .evaluate.run import evaluate_model

        return evaluate_model
    if name == "search_rope_factors":
        from .search import search_rope_factors

        return search_rope_factors
    if name == "METHODS":
        from .methods import METHODS

        return METHODS
    raise AttributeError(f"module 'longctx_hf' has no attribute {name!r}")
