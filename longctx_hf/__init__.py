"""longctx_hf: extend the context window of HuggingFace Transformers models, exactly and portably."""
from __future__ import annotations

import sys

__version__ = "0.1.0"
__all__ = ["extend_context", "context_info", "from_pretrained", "ContextInfo", "METHODS", "extend_checkpoint",
           "push_to_hub", "alibi_model_from_config", "finetune",
           "FinetuneOptions", "evaluate_model"]


def __getattr__(name):
    # Lazy so that config-only entry points (`longctx-hf info`) never import torch or transformers.
    if name in ("extend_context", "context_info", "from_pretrained"):
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
    if name == "alibi_model_from_config":
        from .attention import alibi_model_from_config

        return alibi_model_from_config
    if name in ("finetune", "FinetuneOptions"):
        from . import train

        return getattr(train, name)
    if name == "evaluate_model":
        from .evaluate.run import evaluate_model

        return evaluate_model
    if name == "METHODS":
        from .methods import METHODS

        return METHODS
    raise AttributeError(f"module 'longctx_hf' has no attribute {name!r}")


def _register_with_transformers():
    """ALiBi checkpoints then load without trust_remote_code: registers the rope type and attention functions."""
    try:
        from .remote import alibi_modeling  # noqa: F401  (registers on import)
    except Exception as err:  # never break `import transformers` itself
        import warnings

        warnings.warn(f"longctx_hf could not register ALiBi with transformers: {err}")


class _RegisterAfterTransformersImport:
    """Registers as soon as transformers is imported, so `import longctx_hf` itself stays free of torch.

    The finder stays installed until transformers is really executed: a `find_spec("transformers")` probe (as
    availability checks do) must not use it up.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        spec = self._find_with_the_others(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        finder = self

        def exec_then_register(module):
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            exec_module(module)
            _register_with_transformers()

        spec.loader.exec_module = exec_then_register
        return spec

    def _find_with_the_others(self, fullname):
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, None)
                if spec is not None:
                    return spec
        return None


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(finder, _RegisterAfterTransformersImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformersImport())
