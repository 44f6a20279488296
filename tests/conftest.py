"""Shared test set-up: fp32 everywhere, CPU only, no network."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded default model (tiny, random weights, real Mistral tokenizer), written to a temp cache."""
    from llava_jax.default_model import default_model_dir

    return default_model_dir(tmp_path_factory.mktemp("llava-jax-cache"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    import llava_jax

    return llava_jax.load(str(tiny_model_dir))
