"""LLaVA-1.5 end-to-end fp32 logits parity against transformers' LlavaForConditionalGeneration.

Bound: max |diff| < 1e-4 on logits of standard deviation ~1 (weights scaled by builders.randomize_). Both
sides compute in fp32; the only differences are summation order inside matmuls and softmax (about 1e-7
relative per op, measured max 7e-6 over a few layers), so 1e-4 leaves room for platform variation while a real
error (a wrong mask, a tanh GELU, a RoPE offset) moves logits by 1e-2 or more.
"""

import numpy as np
import pytest
import torch

import llava_jax

from builders import IMAGE_TOKEN, build_llava, save

BOUND = 1e-4


def make_batch(tokens_per_image, seed=0):
    """Three rows: one image; left-padded with two images; text only (no image tokens)."""
    rng = np.random.default_rng(seed)
    seq = 2 * tokens_per_image + 20
    ids = rng.integers(0, IMAGE_TOKEN - 10, (3, seq))
    mask = np.ones_like(ids)
    ids[0, 2 : 2 + tokens_per_image] = IMAGE_TOKEN
    mask[1, :4] = 0
    ids[1, :4] = 0
    ids[1, 5 : 5 + tokens_per_image] = IMAGE_TOKEN
    ids[1, 7 + tokens_per_image : 7 + 2 * tokens_per_image] = IMAGE_TOKEN
    pixel_values = rng.standard_normal((3, 3, 56, 56)).astype(np.float32)
    return ids, mask, pixel_values


@pytest.mark.parametrize("text", ["mha", "gqa"])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava15_logits_match_transformers(tmp_path, text, strategy):
    hf = build_llava("llava", text, strategy, seed=1)
    model = llava_jax.load(save(hf, tmp_path / "ckpt"))
    assert model.config.text.num_kv_heads == (2 if text == "gqa" else 4)
    assert model.config.text.rope_theta == (1e6 if text == "gqa" else 1e4)
    tokens = 16 + (strategy == "full")
    ids, mask, px = make_batch(tokens)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                 attention_mask=torch.tensor(mask)).logits.numpy()
    out = model.forward(ids, px, attention_mask=mask)
    assert out.shape == ref.shape == (3, ids.shape[1], hf.config.text_config.vocab_size)
    valid = mask.astype(bool)  # left-padding positions are undefined in both
    # The comparison is only meaningful if logits are of order one and differ between positions.
    assert 0.5 < ref[valid].std() < 5
    assert len(set(ref.argmax(-1)[valid].tolist())) > 10
    np.testing.assert_array_less(np.abs(out - ref)[valid], BOUND)
    np.testing.assert_array_equal(out.argmax(-1)[valid], ref.argmax(-1)[valid])


def test_text_only_forward_without_pixels(tmp_path):
    hf = build_llava("llava", "gqa", seed=2)
    model = llava_jax.load(save(hf, tmp_path / "ckpt"))
    ids = np.random.default_rng(3).integers(0, IMAGE_TOKEN, (2, 12))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_array_less(np.abs(model.forward(ids) - ref), BOUND)


def test_image_token_count_mismatch_is_an_error(tmp_path):
    model = llava_jax.load(save(build_llava("llava", "mha"), tmp_path / "ckpt"))
    ids, mask, px = make_batch(16)
    with pytest.raises(llava_jax.InputError, match="48 image tokens.*32 features"):
        model.forward(ids, px[:2], attention_mask=mask)
    with pytest.raises(llava_jax.InputError, match="48 image tokens.*0 features"):
        model.forward(ids, attention_mask=mask)
    with pytest.raises(llava_jax.InputError, match="pixel_values must be"):
        model.forward(ids, px[:, :, :28], attention_mask=mask)
