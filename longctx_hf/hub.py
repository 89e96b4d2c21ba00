"""Push an extended checkpoint (a folder, or a model in memory) to the Hugging Face Hub.

A thin layer over huggingface_hub's `create_repo` + `upload_folder`; the token comes from the usual places
(`token=`, HF_TOKEN, `hf auth login`). Large files go through the Hub's LFS / Xet upload as usual.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from . import model_card

DEFAULT_MESSAGE = "Upload context-extended checkpoint (longctx-hf)"


def push_to_hub(model_or_path, repo_id: str, *, private: bool | None = None, commit_message: str | None = None,
                token: str | None = None):
    """Create `repo_id` if needed and upload a checkpoint folder or a transformers model; returns the CommitInfo.

    A model in memory is saved with `save_pretrained` into a temporary folder first, with a model card written
    from its config (push the tokenizer separately, or extend and push a folder that has it).
    """
    if not isinstance(repo_id, str) or not (model_card.REPO_ID.match(repo_id) or model_card.REPO_NAME.match(repo_id)):
        raise ValueError(f"repo_id must look like 'owner/name' (or 'name' in your own namespace), got {repo_id!r}")
    if isinstance(model_or_path, (str, os.PathLike)):
        folder = Path(model_or_path)
        if not (folder / "config.json").is_file():
            raise ValueError(f"model_or_path must be a checkpoint folder with a config.json; got {str(folder)!r}")
        return _upload(folder, repo_id, private, commit_message, token)
    if not hasattr(model_or_path, "save_pretrained"):
        raise TypeError("model_or_path must be a checkpoint folder or a transformers model (with save_pretrained), "
                        f"got {type(model_or_path).__name__}")
    with tempfile.TemporaryDirectory(prefix="longctx-hf-push-") as tmp:
        model_or_path.save_pretrained(tmp)
        config = json.loads((Path(tmp) / "config.json").read_text())
        base_model = model_card.repo_id_in(model_or_path.config.to_dict())
        (Path(tmp) / "README.md").write_text(model_card.render(config, base_model=base_model, name=repo_id))
        return _upload(Path(tmp), repo_id, private, commit_message, token)


def _upload(folder: Path, repo_id, private, commit_message, token):
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message or DEFAULT_MESSAGE)
