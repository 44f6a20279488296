"""`LlavaProcessor` returns the same input_ids, attention_mask, pixel_values and image_sizes as HF's processors.

The tokenizer is the real Mistral one (from mistral-common) with `<image>` added as id 32000, as llava-hf's
llava-v1.6-mistral-7b-hf tokenizer has it. Pixels are compared exactly.
"""

import numpy as np
import pytest
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
)

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.processor import LlavaProcessor as OurProcessor
from llava_jax.prompt import PromptError, mistral_tokenizer_dir

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CAT = str(__import__("pathlib").Path(__file__).parent.parent / "llava_jax" / "assets" / "cat.jpg")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(str(mistral_tokenizer_dir(tmp_path_factory.mktemp("tok"))))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tok.convert_tokens_to_ids("<image>") == 32000
    return tok


def config(kind):
    text = TextConfig(vocab_size=32064, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4,
                      num_kv_heads=4, head_dim=16)
    if kind == "llava":
        return LlavaConfig(vision=VisionConfig(), text=text, model_type="llava", image_token_id=32000)
    return LlavaConfig(vision=VisionConfig(), text=text, model_type="llava_next", image_token_id=32000,
                       image_aspect_ratio="anyres", image_grid_pinpoints=tuple(map(tuple, PINPOINTS)),
                       patch_merge_type="spatial_unpad")


def images():
    rng = np.random.default_rng(40)
    noise = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    return [Image.open(CAT), noise(667, 1000), noise(748, 352)]


TEXTS = ["USER: <image>\nWhat is shown here? ASSISTANT:", "[INST] <image>\nCompare with <image>\nplease [/INST]"]


def compare(ours, ref):
    assert set(ours) == set(ref) - {"num_image_tokens"} or set(ours) == set(ref)
    for key in ours:
        np.testing.assert_array_equal(ours[key], np.asarray(ref[key]), err_msg=key)


def test_llava_next_processor_matches_hf(tokenizer):
    image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS, size={"shortest_edge": 336},
                                                 crop_size={"height": 336, "width": 336})
    hf = LlavaNextProcessor(image_processor=image_processor,
                            tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                            num_additional_image_tokens=1)
    ours = OurProcessor(config("llava_next"), tokenizer)
    assert ours.image_token_in_vocab
    ims = images()
    for text, imgs in [(TEXTS[0], ims[:1]), (TEXTS[1], ims[1:])]:
        ref = hf(images=imgs, text=text, return_tensors="np")
        got = ours(images=imgs, text=text)
        assert int((got["input_ids"] == 32000).sum()) > 1000
        compare(got, ref)


def test_llava15_processor_matches_hf(tokenizer):
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    hf = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    ours = OurProcessor(config("llava"), tokenizer)
    ims = images()
    ref = hf(images=ims[:2], text=[TEXTS[0], TEXTS[0]], return_tensors="np")
    got = ours(images=ims[:2], text=[TEXTS[0], TEXTS[0]])
    assert int((got["input_ids"] == 32000).sum()) == 2 * 576
    compare(got, ref)


def test_marker_count_mismatch(tokenizer):
    ours = OurProcessor(config("llava_next"), tokenizer)
    with pytest.raises(PromptError, match="1 <image> marker.*2 image"):
        ours(images=images()[:2], text=TEXTS[0])
