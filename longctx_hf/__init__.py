"""longctx_hf: extend the context window of HuggingFace Transformers models, exactly and portably."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["extend_context", "context_info", "ContextInfo", "METHODS", "evaluate_model"]


def __getattr__(name):
    # Lazy so that config-only entry points (`longctx-hf info`) never import torch or transformers.
    if name in ("extend_context", "context_info"):
        from . import patch

        return getattr(patch, name)
    if name == "ContextInfo":
        from .hf_config import ContextInfo

        return ContextInfo
    if name == "evaluate_model":
        from .evaluate.run import evaluate_model

        return evaluate_model
    if name == "METHODS":
        from .methods import METHODS

        return METHODS
    raise AttributeError(f"module 'longctx_hf' has no attribute {name!r}")
