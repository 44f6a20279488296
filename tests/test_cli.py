"""The `llava-jax` command, run as users run it (subprocesses): generate, chat over stdin, and bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ASSETS = Path(__file__).parent.parent / "llava_jax" / "assets"
CAT = str(ASSETS / "cat.jpg")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cli-cache")
    return {**os.environ, "LLAVA_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}


def run(args, env, stdin=None):
    return subprocess.run([sys.executable, "-m", "llava_jax", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_readme_main_job_answers_right(env):
    """The README's main job: the embedded default model (a toy trained on shapes) about a shipped picture."""
    out = run(["generate", "--image", str(ASSETS / "red-circle.png"), "--prompt", "What color is the shape?"], env)
    assert out.returncode == 0, out.stderr
    assert "TOY" in out.stderr
    assert out.stdout.strip() == "red"


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


# ---------------------------------------------------------------- bad values: one line, exit 2, no traceback

BAD_VALUES = [
    (["--temperature", "-1"], "argument --temperature: temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "argument --temperature: temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "argument --temperature: temperature must be a finite number >= 0"),
    (["--temperature", "warm"], "argument --temperature: 'warm' is not a number"),
    (["--top-p", "0"], r"argument --top-p: top_p must be a number in \(0, 1\]"),
    (["--top-p", "1.5"], r"argument --top-p: top_p must be a number in \(0, 1\]"),
    (["--top-p", "nan"], r"argument --top-p: top_p must be a number in \(0, 1\]"),
    (["--top-k", "0"], "argument --top-k: top_k must be an integer >= 1"),
    (["--top-k", "-3"], "argument --top-k: top_k must be an integer >= 1"),
    (["--top-k", "2.5"], "argument --top-k: '2.5' is not an integer"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: max_new_tokens must be an integer >= 1"),
    (["--max-new-tokens", "2.5"], "argument --max-new-tokens: '2.5' is not an integer"),
    (["--stop", ""], "argument --stop: stop strings must not be empty"),
    (["--seed", "x"], "argument --seed: 'x' is not an integer"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("args, message", BAD_VALUES)
def test_bad_values_exit_2_with_one_line(capsys, command, args, message):
    from llava_jax import cli

    extra = ["--prompt", "hi"] if command == "generate" else []
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, *extra, *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith("llava-jax: error: ") and "Traceback" not in err, err
    import re

    assert re.search(message, err), err


def test_bad_value_in_a_real_process(env):
    out = run(["generate", "--prompt", "hi", "--top-p", "nan"], env)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "llava-jax: error: argument --top-p: top_p must be a number in (0, 1] (1 = off), got nan\n"


# ---------------------------------------------------------------- chat survives bad input


def test_chat_survives_bad_images_and_long_messages(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import io

    import llava_jax
    from llava_jax import cli

    short = tmp_path / "short"  # a 1024-token context, so that an over-long message is quick to write
    shutil.copytree(tiny_model_dir, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 1024
    (short / "config.json").write_text(json.dumps(cfg))
    (short / "checksums.json").unlink()  # an edited copy: the cache's checksums no longer hold
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    lines = ["Hello there", "/image nonexistent.png", f"/image {garbage}", "word " * 1100, f"/image {CAT}",
             "word " * 1100, "And now?", "/quit"]
    model = llava_jax.load(str(short))
    monkeypatch.setattr(cli, "_load_model", lambda args: model)  # one model (and one compile) for both sides
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    monkeypatch.setenv("LLAVA_JAX_COMPILATION_CACHE", "off")
    monkeypatch.setenv("LLAVA_JAX_XLA_FLAGS", "0")
    code = cli.main(["chat", "--model", str(short), "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert code == 0, err
    errors = [line for line in err.splitlines() if line.startswith("llava-jax: error: ")]
    assert len(errors) == 4, err
    assert "image file not found: 'nonexistent.png'" in errors[0]
    assert f"cannot read image file '{garbage}'" in errors[1]
    assert "context is 1024 tokens" in errors[2] and "context is 1024 tokens" in errors[3]
    assert "the 1 image(s) attached to that message were dropped" in err
    answers = [line.removeprefix("ASSISTANT> ") for line in out.splitlines() if line.startswith("ASSISTANT> ")]
    assert len(answers) == 2
    # The failed messages left no trace: the conversation is exactly "Hello there", then "And now?".
    session = model.chat(max_new_tokens=6)
    assert answers == [session.ask("Hello there"), session.ask("And now?")]
