"""Shared test set-up: fp32 everywhere, CPU only, no network."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from llava_jax.xla_flags import set_default_xla_flags  # noqa: E402

# The XLA:CPU flags the `llava-jax` command runs with, set before the backend starts: tests then compute as the
# CLI does, and a test that runs `cli.main` in this process (which sets them too) cannot leave a subprocess it
# starts later computing under different flags than this process (different reduction orders, last-bit diffs).
set_default_xla_flags()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded random-weight model (tiny, real Mistral tokenizer), written to a temp cache."""
    from llava_jax.default_model import random_model_dir

    return random_model_dir(tmp_path_factory.mktemp("llava-jax-cache"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    import llava_jax

    return llava_jax.load(str(tiny_model_dir))
