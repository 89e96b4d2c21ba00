import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import tiny_model  # noqa: E402


@pytest.fixture
def llama():
    return tiny_model("llama")
