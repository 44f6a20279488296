"""Configs the references run beyond the released checkpoints: fp32 parity for each.

- transformers: other activations (decoder `gelu`, vision `gelu_new`, projector `gelu_pytorch_tanh`), several
  vision feature layers concatenated (`[-2, -5]`: the second-to-last layer and the embeddings), for LLaVA-1.5
  and LLaVA-NeXT; an image processor whose `size` (shortest edge) differs from its `crop_size`.
- the original code (llava-torch's `llava_arch` merge and `mm_utils` preprocessing): `anyres` + `flat`, `pad` +
  `spatial_unpad`, and an original checkpoint saved under transformers 5 (vision keys without `vision_model.`).

Logit bound as in test_parity_llava.py: max |diff| < 1e-4 on logits of order one, both sides fp32 (only the
summation order differs, measured about 1e-5); a wrong activation or layer moves logits by 1e-2 or more.
Pixels are compared exactly (both sides run PIL bicubic on the same uint8 images).
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from llava.mm_utils import process_images
from llava.model.llava_arch import LlavaMetaForCausalLM
from PIL import Image
from safetensors.numpy import save_file
from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil

import llava_jax
from convert.converter import convert
from llava_jax.config import load_config
from llava_jax.image import CLIP_MEAN, CLIP_STD, preprocess_anyres, preprocess_square
from llava_jax.processor import LlavaProcessor

from builders import (
    build_llava,
    image_rows,
    original_config,
    original_state,
    random_pixels,
    save,
    vision_config,
)

BOUND = 1e-4
IMAGE_TOKEN_INDEX = -200  # the original code's image placeholder id


def assert_close_logits(out, ref, valid=None):
    valid = np.ones(ref.shape[:2], bool) if valid is None else valid
    assert out.shape == ref.shape
    # meaningful only if logits are of order one and differ between positions
    assert 0.5 < ref[valid].std() < 5 and len(set(ref.argmax(-1)[valid].tolist())) > 5
    np.testing.assert_array_less(np.abs(out - ref)[valid], BOUND)


# ---------------------------------------------------------------- transformers: activations and feature layers


def variant_model(kind):
    """4 vision layers, so hidden state -5 is the embeddings (after pre_layrnorm)."""
    return build_llava(kind, "gqa", seed=21, vision=vision_config(num_hidden_layers=4, hidden_act="gelu_new"),
                       text_kw={"hidden_act": "gelu"}, projector_hidden_act="gelu_pytorch_tanh",
                       vision_feature_layer=[-2, -5])


def test_llava15_variant_matches_transformers(tmp_path):
    hf = variant_model("llava")
    model = llava_jax.load(save(hf, tmp_path / "ckpt"))
    cfg = model.config
    assert (cfg.text.hidden_act, cfg.vision.hidden_act, cfg.projector_hidden_act) == ("gelu", "gelu_new",
                                                                                     "gelu_pytorch_tanh")
    assert cfg.vision_feature_layers == (3, 0) and cfg.vision_layers_used == 3
    ids, mask = image_rows([[3, ("img", 0), 5], [("img", 1), 2, ("img", 2), 4], [9]], [16, 16, 16], seed=22)
    px = random_pixels([1, 1, 1], seed=23)[:, 0]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                 attention_mask=torch.tensor(mask)).logits.numpy()
    assert_close_logits(model.forward(ids, px, attention_mask=mask), ref, mask.astype(bool))


def test_llava_next_variant_matches_transformers(tmp_path):
    hf = variant_model("llava_next")
    model = llava_jax.load(save(hf, tmp_path / "ckpt"))
    sizes = [(40, 100), (150, 47)]
    plans = [model.plan_image(h, w) for h, w in sizes]
    ids, mask = image_rows([[3, ("img", 0), 5], [("img", 1), 4]], [p.num_tokens for p in plans], seed=24)
    px = random_pixels([p.num_crops for p in plans], seed=25)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), image_sizes=torch.tensor(sizes),
                 attention_mask=torch.tensor(mask)).logits.numpy()
    out = model.forward(ids, px, image_sizes=np.array(sizes), attention_mask=mask)
    assert_close_logits(out, ref, mask.astype(bool))


# ---------------------------------------------------------------- the original code: merge variants, t5 keys


class OriginalOnHF:
    """The original `llava_arch.prepare_inputs_labels_for_multimodal` around an HF model's own parts: its
    `encode_images` is the original one (hidden_states[-2], CLS dropped, projector) on HF's tower and projector,
    its embeddings HF's. The decoder is HF's, so only the original merge and preprocessing are under test."""

    def __init__(self, hf, aspect, merge, newline=None):
        self.hf = hf
        self.config = SimpleNamespace(mm_patch_merge_type=merge, image_aspect_ratio=aspect,
                                      image_grid_pinpoints=[list(p) for p in hf.config.image_grid_pinpoints]
                                      if aspect == "anyres" else None)
        vision = hf.config.vision_config
        tower = SimpleNamespace(num_patches_per_side=vision.image_size // vision.patch_size, config=vision)
        self.model = SimpleNamespace(image_newline=newline, embed_tokens=hf.get_input_embeddings())
        self.get_vision_tower = lambda: tower
        self.get_model = lambda: self.model
        self.device = torch.device("cpu")

    def encode_images(self, images):
        hidden = self.hf.model.vision_tower(images, output_hidden_states=True).hidden_states[-2][:, 1:]
        return self.hf.model.multi_modal_projector(hidden)

    @torch.no_grad()
    def logits(self, input_ids, images, image_sizes=None):
        out = LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal(
            self, torch.tensor(input_ids), None, None, None, None, images, image_sizes=image_sizes)
        hidden = self.hf.model.language_model(inputs_embeds=out[4]).last_hidden_state
        return self.hf.lm_head(hidden).numpy()


def write_original(path, tensors, config):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def clip_dir(hf, path):
    hf.config.vision_config.save_pretrained(path)  # config only: original configs name their CLIP tower
    return str(path)


def test_original_anyres_flat_matches_original_code(tmp_path):
    """anyres + flat: the crops' features one after the other (base first), no unpad, no image_newline."""
    hf = build_llava("llava_next", "gqa", seed=31)
    state = original_state(hf, with_vision=True)
    del state["model.image_newline"]  # llava_arch creates it only for an unpad merge
    config = original_config(hf, clip_dir(hf, tmp_path / "clip")) | {"mm_patch_merge_type": "flat"}
    model = llava_jax.load(write_original(tmp_path / "ckpt", state, config))
    assert model.config.model_type == "llava_next" and not model.config.has_image_newline
    h, w = 40, 100
    plan = model.plan_image(h, w)
    assert plan.num_tokens == plan.num_crops * 16 and plan.num_crops == 3
    px = random_pixels([plan.num_crops], seed=32)
    ref = OriginalOnHF(hf, "anyres", "flat").logits([[1, 5, 7, IMAGE_TOKEN_INDEX, 9, 11]], torch.tensor(px),
                                                    image_sizes=[(w, h)])
    ids = np.array([[1, 5, 7, *[IMAGE_TOKEN_INDEX] * plan.num_tokens, 9, 11]])
    assert_close_logits(model.forward(ids, px, image_sizes=np.array([[h, w]])), ref)


def test_original_pad_spatial_unpad_transformers5_keys_match_original_code(tmp_path):
    """pad + spatial_unpad: llava_arch sends the 4-D image batch straight to the projector (the merge type is
    never read; the checkpoint's image_newline is unused). The checkpoint is saved as llava-torch saves it under
    transformers 5: vision keys `model.vision_tower.vision_tower.embeddings.*`, no `vision_model.`."""
    hf = build_llava("llava", "mha", seed=33)
    state = original_state(hf, with_vision=True, vision_prefix="model.vision_tower.vision_tower.")
    assert "model.vision_tower.vision_tower.embeddings.patch_embedding.weight" in state
    newline = np.random.default_rng(34).standard_normal(hf.config.text_config.hidden_size).astype(np.float32)
    state["model.image_newline"] = newline
    config = original_config(hf, clip_dir(hf, tmp_path / "clip")) | {"mm_patch_merge_type": "spatial_unpad"}
    model = llava_jax.load(write_original(tmp_path / "ckpt", state, config))
    assert model.config.model_type == "llava" and model.config.image_aspect_ratio == "pad"
    image = Image.fromarray(np.random.default_rng(35).integers(0, 256, (40, 90, 3), np.uint8))
    clip = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)
    images = process_images([image], clip, SimpleNamespace(image_aspect_ratio="pad"))  # the original's pixels
    processed = LlavaProcessor(model.config, None).process_image(image)
    assert np.array_equal(processed.crops, images.numpy()) and processed.num_tokens == 16
    ref = OriginalOnHF(hf, "pad", "spatial_unpad", torch.tensor(newline)).logits(
        [[1, 5, 7, IMAGE_TOKEN_INDEX, 9, 11]], images)
    ids = np.array([[1, 5, 7, *[IMAGE_TOKEN_INDEX] * 16, 9, 11]])
    assert_close_logits(model.forward(ids, processed.crops), ref)


# ---------------------------------------------------------------- image processor size != crop_size


def noise_image(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8))


SIZE, CROP = 64, 56  # transformers' own processor tests use 20 / 18
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]


def processor_kwargs():
    return dict(size={"shortest_edge": SIZE}, crop_size={"height": CROP, "width": CROP}, resample=3,
                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


@pytest.mark.parametrize("wh", [(40, 100), (150, 47), (120, 110), (30, 31)])
def test_resize_other_than_crop_matches_both_references(wh):
    image = noise_image(*wh, seed=sum(wh))
    clip = CLIPImageProcessorPil(**processor_kwargs())
    ref = np.asarray(clip(image, return_tensors="np")["pixel_values"])
    ours = preprocess_square(image, "crop", CROP, "hf", resize=SIZE)
    assert np.array_equal(ours, ref) and not np.array_equal(ours, preprocess_square(image, "crop", CROP))
    pad = process_images([image], clip, SimpleNamespace(image_aspect_ratio="pad")).numpy()
    assert np.array_equal(preprocess_square(image, "pad", CROP, "original", resize=SIZE), pad)
    nxt = LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS, **processor_kwargs())
    ours, plan = preprocess_anyres(image, PINPOINTS, "hf", CROP, 14, resize=SIZE)
    assert np.array_equal(ours, np.asarray(nxt(image, return_tensors="np")["pixel_values"][0]))
    original = process_images([image], clip, SimpleNamespace(image_aspect_ratio="anyres",
                                                             image_grid_pinpoints=PINPOINTS)).numpy()[0]
    assert np.array_equal(preprocess_anyres(image, PINPOINTS, "original", CROP, 14, resize=SIZE)[0], original)


def test_processor_size_from_checkpoint_end_to_end(tmp_path):
    """A llava-hf NeXT checkpoint with size 64 / crop 56: pixels as transformers' processor, logits as its model."""
    hf = build_llava("llava_next", "gqa", seed=41)
    path = save(hf, tmp_path / "ckpt")
    nxt = LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS, **processor_kwargs())
    nxt.save_pretrained(path)
    model = llava_jax.load(path)
    assert model.config.image_resize == SIZE
    image = noise_image(100, 40, seed=42)
    processed = LlavaProcessor(model.config, None).process_image(image)  # no tokenizer: ids built below
    ref_px = nxt(image, return_tensors="np")
    assert np.array_equal(processed.crops[None], ref_px["pixel_values"])
    assert processed.size == tuple(ref_px["image_sizes"][0])
    ids, mask = image_rows([[4, ("img", 0), 6]], [processed.num_tokens], seed=43)
    px, sizes = processed.crops[None], np.array([processed.size])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), image_sizes=torch.tensor(sizes)).logits
    assert_close_logits(model.forward(ids, px, image_sizes=sizes), ref.numpy())
    convert(path, str(tmp_path / "converted"))  # the converted checkpoint keeps the processor size
    assert load_config(str(tmp_path / "converted")).image_resize == SIZE
