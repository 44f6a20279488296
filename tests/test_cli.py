"""The `llava-jax` command, run as users run it (subprocesses): generate, chat over stdin, and bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CAT = str(Path(__file__).parent.parent / "llava_jax" / "assets" / "cat.jpg")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cli-cache")
    return {**os.environ, "LLAVA_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}


def run(args, env, stdin=None):
    return subprocess.run([sys.executable, "-m", "llava_jax", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=300)


def test_generate_on_the_embedded_default(env):
    out = run(["generate", "--image", CAT, "--prompt", "What is in this picture?", "--max-new-tokens", "12"], env)
    assert out.returncode == 0, out.stderr
    assert "RANDOM weights" in out.stderr
    assert len(out.stdout.strip()) > 0


def test_chat_over_stdin(env):
    out = run(["chat", "--max-new-tokens", "6"], env, stdin=f"/image {CAT}\nWhat is this?\nAnd now?\n/quit\n")
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.splitlines() if line.startswith("ASSISTANT> ")]
    assert len(answers) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "no/such/file.jpg", "--prompt", "hi"], "image file not found"),
        (["--image", __file__, "--prompt", "hi"], "cannot identify image|not an image|unreadable"),
        (["--image", CAT, "--image", CAT, "--template", "raw", "--prompt", "[INST] <image>\nhi [/INST]"],
         "1 <image> marker.*2 image"),
        (["--model", "/no/such/dir", "--prompt", "hi"], "not a checkpoint directory"),
    ],
)
def test_bad_input_exits_nonzero_with_a_message(env, args, message):
    out = run(["generate", *args], env)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    import re

    assert re.search(message, out.stderr), out.stderr


def test_prompt_longer_than_context(env, tiny_model_dir, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(tiny_model_dir, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 512
    (short / "config.json").write_text(json.dumps(cfg))
    (short / "checksums.json").unlink()  # an edited copy: the cache's checksums no longer hold
    out = run(["generate", "--model", str(short), "--image", CAT, "--prompt", "Describe."], env)
    assert out.returncode == 2 and "context is 512 tokens" in out.stderr
