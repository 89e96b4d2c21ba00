"""Push an extended checkpoint (a folder, or a model in memory) to the Hugging Face Hub.

A thin layer over huggingface_hub's `create_repo` + `upload_folder`; the token comes from the usual places
(`token=`, HF_TOKEN, `hf auth login`). Large files go through the Hub's LFS / Xet upload as usual.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

DEFAULT_MESSAGE = "Upload context-extended checkpoint (longctx-hf)"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # owner/name, as a source or a base model


def looks_like_repo_id(text: str) -> bool:
    """`owner/name` that is not an existing path: how `extend`/`info` tell a Hub source from a local folder."""
    return bool(REPO_ID.match(text)) and not Path(text).exists()


def check_repo_id(repo_id) -> str:
    """`repo_id` if the Hub accepts it ('owner/name', or 'name' in your own namespace), else a ValueError.

    huggingface_hub's own validator (imported here only: huggingface_hub costs ~0.3 s and `extend` without a push
    must stay fast); called before anything is written or sent.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str):
        raise ValueError(f"repo_id must be a string like 'owner/name', got {type(repo_id).__name__} {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id must look like 'owner/name' (or 'name' in your own namespace): {err}") from None
    return repo_id


def push_to_hub(model_or_path, repo_id: str, *, private: bool | None = None, commit_message: str | None = None,
                token: str | None = None):
    """Create `repo_id` if needed and upload a checkpoint folder or a transformers model; returns the CommitInfo.

    A model in memory is saved with `save_pretrained` into a temporary folder first, with a model card written
    from its config (push the tokenizer separately, or extend and push a folder that has it).
    """
    from . import model_card

    check_repo_id(repo_id)
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
