"""Registry of context-extension methods: one small pure module each, all satisfying one explicit contract.

Every method module defines (checked below when the registry loads, so a missing piece fails at import, not in
the middle of a patch):
- NAME, ALIASES, HF_ROPE_TYPE (the config's rope_type), KIND: "rope" (new frequencies) or "attention_bias"
  (rotary off, attention functions swapped: alibi);
- REMOTE_FILES (files of longctx_hf/remote/ written beside config.json; empty for native methods), REMOTE_CLASS
  (the `auto_map` target in them, or None), SAVED_ATTENTION (the attn_implementation written into config.json, or
  None), TRAINING_FREE (finetune refuses it);
- a frozen `Spec` dataclass validated on construction, `rope_parameters(spec)` (the transformers-5 config dict)
  and `max_position_embeddings(spec)`;
- for KIND "rope" also `frequencies(spec, seq_len=None, device=None)` -> (float32 inv_freq, attention scaling) and
  `attention_scaling(spec)`.
Adding a method = one module here + one entry in METHODS.
"""
from __future__ import annotations

import difflib

from . import alibi, dynamic_longrope, dynamic_ntk, dynamic_yarn, longrope, ntk, pi, self_extend, yarn
from .base import remote_source

KINDS = ("rope", "attention_bias")
CONTRACT = {"NAME": str, "ALIASES": tuple, "HF_ROPE_TYPE": str, "KIND": str, "REMOTE_FILES": tuple,
            "REMOTE_CLASS": (str, type(None)), "SAVED_ATTENTION": (str, type(None)), "TRAINING_FREE": bool}
FUNCTIONS = {"rope": ("rope_parameters", "max_position_embeddings", "frequencies", "attention_scaling"),
             "attention_bias": ("rope_parameters", "max_position_embeddings")}


def check_method(module) -> None:
    """A TypeError naming what a method module lacks (the registry's contract above)."""
    for name, kind in CONTRACT.items():
        if not isinstance(getattr(module, name, None), kind):
            raise TypeError(f"method module {module.__name__} must define {name} ({kind})")
    if module.KIND not in KINDS:
        raise TypeError(f"method module {module.__name__}: KIND must be one of {KINDS}, got {module.KIND!r}")
    missing = [name for name in FUNCTIONS[module.KIND] if not callable(getattr(module, name, None))]
    if not isinstance(getattr(module, "Spec", None), type) or missing:
        raise TypeError(f"method module {module.__name__} must define Spec and {', '.join(FUNCTIONS[module.KIND])}")
    if bool(module.REMOTE_FILES) != (module.REMOTE_CLASS is not None):
        raise TypeError(f"method module {module.__name__}: REMOTE_FILES and REMOTE_CLASS go together")


METHODS = {module.NAME: module for module in (pi, ntk, dynamic_ntk, yarn, dynamic_yarn, longrope, dynamic_longrope, self_extend, alibi)}
for _module in METHODS.values():
    check_method(_module)
ALIASES = {alias: module.NAME for module in METHODS.values() for alias in module.ALIASES}


def remote_code_files(method) -> dict:
    """{file name: source} a method's checkpoints carry so trust_remote_code loads them without longctx_hf."""
    return {name: remote_source(name) for name in method.REMOTE_FILES}


def auto_map(method) -> dict:
    """The config's `auto_map` entries pointing at the method's remote code (empty for native methods)."""
    return {"AutoModelForCausalLM": method.REMOTE_CLASS} if method.REMOTE_CLASS else {}


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
