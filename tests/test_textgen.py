"""The text API on the embedded default model: templates, images, batching, streaming, stop strings, chat."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import llava_jax
from llava_jax.prompt import PromptError

CAT = str(Path(__file__).parent.parent / "llava_jax" / "assets" / "cat.jpg")


def wide_image():
    rng = np.random.default_rng(50)
    return Image.fromarray(rng.integers(0, 256, (300, 900, 3), dtype=np.uint8))


def test_single_prompt_returns_text(tiny_model):
    text, ids = tiny_model.generate("What is in the picture?", images=CAT, max_new_tokens=12, return_ids=True)
    assert isinstance(text, str) and text
    assert 1 <= len(ids) <= 12
    assert tiny_model.tokenizer.decode(ids, skip_special_tokens=True).strip() == text


def test_batch_with_mixed_images_equals_each_alone(tiny_model):
    prompts = ["Describe the cat.", "Hello, who are you?", "Compare the two pictures."]
    images = [CAT, None, [wide_image(), CAT]]
    batch = tiny_model.generate(prompts, images=images, max_new_tokens=10, return_ids=True)
    for prompt, imgs, got in zip(prompts, images, batch, strict=True):
        assert tiny_model.generate(prompt, images=imgs, max_new_tokens=10, return_ids=True) == got


def test_streaming_yields_the_final_text(tiny_model):
    pieces = []
    text = tiny_model.generate("Tell me a story.", max_new_tokens=16, stream=lambda row, delta: pieces.append(delta))
    assert len(pieces) > 3 and "".join(pieces).strip() == text


def test_stop_string_truncates(tiny_model):
    free = tiny_model.generate("Tell me a story.", max_new_tokens=16)
    word = free.split()[2]
    cut = tiny_model.generate("Tell me a story.", max_new_tokens=16, stop=[word])
    assert cut == free[: free.index(word)].strip()


def test_seeded_sampling(tiny_model):
    a = tiny_model.generate("Hi", max_new_tokens=10, temperature=1.0, seed=1)
    b = tiny_model.generate("Hi", max_new_tokens=10, temperature=1.0, seed=1)
    c = tiny_model.generate("Hi", max_new_tokens=10, temperature=1.0, seed=2)
    assert a == b != c


def test_chat_keeps_the_conversation(tiny_model):
    session = tiny_model.chat(max_new_tokens=8)
    first = session.ask("What is this?", images=CAT)
    second = session.ask("And what color is it?")
    assert session.turns == ["<image>\nWhat is this?", first, "And what color is it?", second]
    assert len(session.images) == 1
    # the second turn saw the first: same as one generate() over the rendered conversation
    from llava_jax.prompt import render_prompt

    prompt = render_prompt(session.template, session.turns[:3])
    assert tiny_model.generate(prompt, images=[CAT], template="raw", max_new_tokens=8) == second


def test_image_marker_mismatch(tiny_model):
    with pytest.raises(PromptError, match="1 <image> marker.*2 image"):
        tiny_model.generate("[INST] <image>\nHi [/INST]", images=[CAT, CAT], template="raw")
    with pytest.raises(llava_jax.InputError, match="2 prompts but 1 image"):
        tiny_model.generate(["a", "b"], images=[CAT])


def test_prompt_longer_than_context(tiny_model_dir, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(tiny_model_dir, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 1024
    (short / "config.json").write_text(json.dumps(cfg))
    (short / "checksums.json").unlink()  # an edited copy: the cache's checksums no longer hold
    model = llava_jax.load(str(short))
    with pytest.raises(llava_jax.InputError, match=r"prompt is \d+ tokens long .*context is 1024"):
        model.generate("Describe.", images=CAT)
    with pytest.warns(UserWarning, match="reduced"):
        model.generate("word " * 1000, max_new_tokens=100)
