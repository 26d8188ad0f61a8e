"""Shared fixtures: the real SmolLM2 tokenizer (fetched and converted by the set-up) and tiny random models."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tok():
    from transformers import AutoTokenizer
    import model
    t = AutoTokenizer.from_pretrained(model.resolve(model.EMBEDDED))
    t.pad_token = t.pad_token or t.eos_token
    return t


@pytest.fixture(scope="session")
def tiny(tok):
    """A 2-layer random Llama with SmolLM2's vocabulary: real code paths, seconds to run."""
    import model
    return model.tiny_model("llama", vocab_size=len(tok))
