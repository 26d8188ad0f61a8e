"""Shared fixtures: the real SmolLM2 tokenizer (fetched and converted by the set-up) and tiny random models."""
import copy
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def peaked(tiny):
    """The tiny random model with sharper output and stronger attention, so that context (the privileged
    hint) changes its next-token distribution measurably; the plain one is nearly uniform everywhere."""
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        model.model.norm.weight.mul_(10)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(5)
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tiny")
    import model as M
    M.save_policy(M.tiny_model("llama", vocab_size=len(tok)), tok, path)
    return path
