"""Hub repo ids: telling one from a local folder, and validating one before anything is written or sent."""
from __future__ import annotations

import re
from pathlib import Path

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
