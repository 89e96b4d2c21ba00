"""The Hugging Face Hub side, in one place: read a source checkpoint's config and files, push an extended one.

A thin layer over huggingface_hub (`hf_hub_download`, `snapshot_download`, `create_repo` + `upload_folder`); the
token comes from the usual places
(`token=`, HF_TOKEN, `hf auth login`). Large files go through the Hub's LFS / Xet upload as usual.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from . import model_card
from .repo_id import check_repo_id

DEFAULT_MESSAGE = "Upload context-extended checkpoint (longctx-hf)"


# ------------------------------------------------------------------------------------------------- reading
def config_file(repo_id: str, revision: str | None = None) -> Path:
    """Only the config.json of a Hub repo (huggingface_hub's cache), never its weights."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, "config.json", revision=revision))


def fetch_config(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """(config.json, the commit it came from): the rest is fetched at that same commit, never a newer push.

    A mistyped local path (`models/llama`) is also a valid repo id: the error says both.
    """
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = config_file(repo_id, revision)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise ValueError(f"{repo_id!r} is not a local folder, and fetching it as a Hub repo id failed: {err}") from err
    return path, path.parent.name  # huggingface_hub's cache: .../snapshots/<commit>/config.json


def download(repo_id: str, commit: str, weight_suffixes) -> Path:
    """The repo at `commit`, with one weight format, like from_pretrained: safetensors when the repo has them,
    else PyTorch .bin; never the other `weight_suffixes` beside them (original/*.pth, .gguf, ...)."""
    from huggingface_hub import list_repo_files, snapshot_download

    files = list_repo_files(repo_id, revision=commit)
    keep = next((suffix for suffix in (".safetensors", ".bin") if any(f.endswith(suffix) for f in files)), None)
    ignore = [f"*{suffix}" for suffix in weight_suffixes if suffix != keep] if keep else None
    return Path(snapshot_download(repo_id, revision=commit, ignore_patterns=ignore))


# ------------------------------------------------------------------------------------------------- pushing
def push_to_hub(model_or_path, repo_id: str, *, private: bool | None = None, commit_message: str | None = None,
                token: str | None = None):
    """Create `repo_id` if needed and upload a checkpoint folder or a transformers model; returns the CommitInfo.

    A model in memory is saved with `save_pretrained` into a temporary folder first, with a model card written
    from its config (push the tokenizer separately, or extend and push a folder that has it).
    """
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
