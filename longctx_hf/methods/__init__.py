"""Registry of context-extension methods: one small pure module each.

A method module provides NAME, ALIASES, HF_ROPE_TYPE, a frozen `Spec` dataclass (validated on construction),
`frequencies(spec, seq_len) -> (inv_freq float32, attention_scaling)`, `rope_parameters(spec)` (the
transformers-5 config dict) and `max_position_embeddings(spec)`. Adding a method = adding a module here.
Attention-bias methods (KIND = "attention_bias", e.g. alibi) have no frequencies: they disable the rotary and
provide attention functions. A method without a native transformers form MAY define REMOTE_FILES (files of
longctx_hf/remote/ written beside config.json) and REMOTE_CLASS (the `auto_map` target in them, "module.Class").
"""
from __future__ import annotations

import difflib

from . import alibi, dynamic_ntk, dynamic_yarn, ntk, pi, self_extend, yarn
from .base import remote_source

METHODS = {module.NAME: module for module in (pi, ntk, dynamic_ntk, yarn, dynamic_yarn, self_extend, alibi)}
ALIASES = {alias: module.NAME for module in METHODS.values() for alias in module.ALIASES}


def remote_code_files(method) -> dict:
    """{file name: source} a method's checkpoints carry so trust_remote_code loads them without longctx_hf."""
    return {name: remote_source(name) for name in getattr(method, "REMOTE_FILES", ())}


def auto_map(method) -> dict:
    """The config's `auto_map` entries pointing at the method's remote code (empty for native methods)."""
    return {"AutoModelForCausalLM": method.REMOTE_CLASS} if hasattr(method, "REMOTE_CLASS") else {}


def get_method(name):
    """The method module for a canonical name or alias; a clear error otherwise."""
    allowed = ", ".join(f"{n!r}" + (f" (alias {', '.join(map(repr, m.ALIASES))})" if m.ALIASES else "")
                        for n, m in METHODS.items())
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, one of {allowed}; got {type(name).__name__} {name!r}")
    key = ALIASES.get(name, name)
    if key not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS) + list(ALIASES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"method must be one of {allowed}; got {name!r}.{hint}")
    return METHODS[key]


def check_options(method, options: dict):
    """A ValueError naming every option the method does not take (with a did-you-mean hint)."""
    allowed = method.Spec.option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, allowed, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        takes = ", ".join(allowed) if allowed else "no options"
        raise ValueError(f"unknown option(s) for method {method.NAME!r}: {', '.join(hints)}; it takes {takes}")


def build_spec(method, *, factor, rope_theta, rotary_dim, original_max_position_embeddings, options: dict):
    """Validate `options` against the method's own option names, then build its Spec (which validates values)."""
    check_options(method, options)
    return method.Spec(
        factor=factor,
        rope_theta=rope_theta,
        rotary_dim=rotary_dim,
        original_max_position_embeddings=original_max_position_embeddings,
        **options,
    )
