"""Shared fixtures. TRITON_INTERPRET must be set before any Triton kernel is decorated, so the
kernels run on CPU tensors (numpy speed): this file is imported before every test module."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Spinning OpenMP threads slow torch 5-10x when the 2 CPU cores are shared (e.g. torchrun tests).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded SmolLM2-135M-Instruct tokenizer (converted from GGUF on first use, then cached)."""
    from calft.models import DEFAULT_MODEL, load_tokenizer

    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory holding a tiny random LlamaForCausalLM (tied embeddings) and its tokenizer."""
    from tiny import make_tiny_model

    path = tmp_path_factory.mktemp("tiny_model")
    make_tiny_model(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from calft.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model (seeded) and its tokenizer, loaded once per module."""
    import torch

    from calft.models import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def fake_gguf(tiny_model_dir, tmp_path, monkeypatch):
    """The embedded model's conversion with the tiny model standing in for the GGUF file:
    (list with one entry per conversion, the converted model's cache folder)."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calft import models

    monkeypatch.setenv("CALFT_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def load_gguf():
        calls.append(1)
        time.sleep(0.3)  # a window in which a concurrent load would start its own conversion
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)

    monkeypatch.setattr(models, "_load_gguf", load_gguf)
    return calls, tmp_path / "cache" / "models" / models.DEFAULT_MODEL
