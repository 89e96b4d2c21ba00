"""The attention runtimes that cache keys before rotation, in one registry keyed by the rope type they serve.

Every runtime module provides the same four functions, checked when this module loads:
`check_supported(model, rotary, base)` (raise before anything changes), `activate(model, base)`,
`deactivate(model)` and `is_active(model)`; `base` is the attention implementation it wraps (sdpa or eager).
Adding a runtime = one module in remote/ (shipped in checkpoints) + one line here.
"""
from __future__ import annotations

import inspect

from .remote import longctx_dynamic_rope, longctx_self_extend

RUNTIMES = {
    "dynamic": longctx_dynamic_rope,
    "dynamic_yarn": longctx_dynamic_rope,
    "dynamic_longrope": longctx_dynamic_rope,
    "self_extend": longctx_self_extend,
}
CONTRACT = {"check_supported": ("model", "rotary", "base"), "activate": ("model", "base"),
            "deactivate": ("model",), "is_active": ("model",)}


def _check_contract(module) -> None:
    for name, parameters in CONTRACT.items():
        function = getattr(module, name, None)
        if not callable(function) or tuple(inspect.signature(function).parameters) != parameters:
            raise TypeError(f"runtime {module.__name__} must define {name}({', '.join(parameters)})")


for _module in set(RUNTIMES.values()):
    _check_contract(_module)


def runtime_for(rope_type):
    """The runtime a rope type needs, or None when transformers' own rotary serves it."""
    return RUNTIMES.get(rope_type)


def deactivate_all(model) -> None:
    for module in set(RUNTIMES.values()):
        module.deactivate(model)


def current_base(model) -> str:
    """The attention implementation a model runs underneath any runtime (sdpa unless it uses eager)."""
    return longctx_self_extend.current_base(model)
