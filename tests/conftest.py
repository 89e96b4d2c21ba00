import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import char_tokenizer, tiny_model  # noqa: E402


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny LLaMA (pretrained length 256) saved with the character tokenizer."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder
