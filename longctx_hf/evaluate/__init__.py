"""Evaluation: perplexity vs length, passkey retrieval, plots; `evaluate_model` runs them for several methods."""
from .passkey import passkey_grid, passkey_prompt, passkey_trial
from .perplexity import default_text, nll_of_last, sliding_window_nll
from .run import evaluate_model, markdown_table, parse_length, write_reports

__all__ = ["passkey_prompt", "passkey_trial", "passkey_grid", "default_text", "nll_of_last", "sliding_window_nll",
           "evaluate_model", "markdown_table", "parse_length", "write_reports"]
