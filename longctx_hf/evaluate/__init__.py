"""Evaluation helpers (passkey retrieval so far)."""
from .passkey import passkey_prompt, passkey_trial

__all__ = ["passkey_prompt", "passkey_trial"]
