"""Self-contained modeling code (torch + transformers only) copied into checkpoints that need trust_remote_code.

Files here must never import longctx_hf: they run in processes where it is not installed.
"""
