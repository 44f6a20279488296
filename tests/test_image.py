"""Pixel and token-layout parity of llava_jax.image against HF transformers 5 and llava-torch 1.2.2.

Every pixel comparison is exact (np.array_equal on float32): both pipelines do the same PIL bicubic
resizes on the same uint8 data and the same float ops, so there is no rounding to tolerate.
"""

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import process_anyres_image, process_images
from llava.model.llava_arch import LlavaMetaForCausalLM
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

from llava_jax.image import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_PINPOINTS,
    NEWLINE,
    AnyResPlan,
    ImageError,
    anyres_plan,
    expand2square,
    load_image,
    preprocess_anyres,
    preprocess_square,
    select_best_resolution,
)

PINPOINTS = [list(p) for p in DEFAULT_PINPOINTS]  # as stored in config.json
S = 336
T = 576

# (width, height), as docs/semantics.md writes sizes; both orientations of the extremes are included.
FIXED_WH = [(1, 1), (5, 3000), (3000, 5), (336, 336), (337, 335), (1000, 667), (1024, 899), (352, 748),
            (300, 200)]
_rng = np.random.default_rng(1234)
RANDOM_WH = [tuple(int(v) for v in _rng.integers(1, 1600, size=2)) for _ in range(5)]
SIZES_WH = FIXED_WH + RANDOM_WH


def make_image(width: int, height: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Seeded noise plus gradients, stripes and a hard-edged box, so resampling differences show."""
    rng = np.random.default_rng(seed + 7919 * width + height)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([255 * xx / max(width - 1, 1), 255 * yy / max(height - 1, 1),
                     127.5 + 127.5 * np.sin(xx / 3.0 + yy / 5.0)], axis=-1)
    base[height // 4 : height // 2 + 1, width // 3 : 2 * width // 3 + 1] = (250, 10, 120)
    image = np.clip(base + rng.normal(0, 40, size=base.shape), 0, 255).astype(np.uint8)
    if channels == 4:
        alpha = rng.integers(0, 256, size=(height, width, 1), dtype=np.uint8)
        image = np.concatenate([image, alpha], axis=-1)
    return image


def clip_kwargs():
    # llava-hf/llava-1.5-*-hf and llava-v1.6-*-hf preprocessor_config.json values, spelled out.
    return dict(size={"shortest_edge": S}, crop_size={"height": S, "width": S}, resample=3,
                do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
                do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


@pytest.fixture(scope="module")
def hf_clip():
    return CLIPImageProcessorPil(**clip_kwargs())


@pytest.fixture(scope="module")
def hf_pad():
    return LlavaImageProcessorPil(do_pad=True, **clip_kwargs())


@pytest.fixture(scope="module")
def hf_next():
    return LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS, do_pad=True, **clip_kwargs())


@pytest.fixture(scope="module")
def hf_processor(hf_next):
    # A tiny in-memory tokenizer: LlavaNextProcessor only needs it to know the image token.
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1, "hi": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                        additional_special_tokens=["<image>"])
    # llava-hf v1.6 processor_config: patch 14, strategy default, one CLS token.
    return LlavaNextProcessor(image_processor=hf_next, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def hf_pixels(processor, image, **kwargs) -> np.ndarray:
    return np.asarray(processor(image, return_tensors="np", **kwargs)["pixel_values"][0])


# --------------------------------------------------------------------------------------------------
# 1. Pixel parity with HF PIL processors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wh", SIZES_WH, ids=[f"{w}x{h}" for w, h in SIZES_WH])
def test_pixels_match_hf(wh, hf_clip, hf_pad, hf_next):
    width, height = wh
    array = make_image(width, height)
    image = Image.fromarray(array)

    ours, plan = preprocess_anyres(image, PINPOINTS, "hf")
    ref = hf_pixels(hf_next, image)
    assert ours.dtype == np.float32 and ref.dtype == np.float32
    assert ours.shape == ref.shape == (plan.num_crops, 3, S, S)
    assert np.array_equal(ours, ref)

    for mode, proc in (("crop", hf_clip), ("pad", hf_pad)):
        ours = preprocess_square(image, mode)
        ref = hf_pixels(proc, image)
        assert ours.shape == (1, 3, S, S) and ours.dtype == np.float32
        assert np.array_equal(ours[0], ref), mode


def test_pad_differs_from_crop_and_matches_expand2square_colour():
    # A wide image: "pad" shows background bands, "crop" does not; the background is exactly the mean.
    image = Image.fromarray(make_image(300, 40))
    pad = preprocess_square(image, "pad")[0]
    crop = preprocess_square(image, "crop")[0]
    assert not np.array_equal(pad, crop)
    corner = pad[:, 0, 0]
    expected = ((np.array([122, 116, 104]) / 255).astype(np.float32) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    assert np.array_equal(corner, expected.astype(np.float32))
    assert expand2square(Image.new("RGB", (4, 2))).getpixel((0, 0)) == (122, 116, 104)


def test_batch_input_and_errors():
    images = [make_image(40, 30, seed=1), make_image(30, 50, seed=2)]
    batch = preprocess_square(images, "crop")
    assert batch.shape == (2, 3, S, S)
    assert np.array_equal(batch[1], preprocess_square(images[1], "crop")[0])
    assert np.array_equal(preprocess_square(np.stack([images[0]] * 2), "pad")[1],
                          preprocess_square(images[0], "pad")[0])
    with pytest.raises(ValueError, match="mode"):
        preprocess_square(images, "squash")
    with pytest.raises(ValueError, match="no images"):
        preprocess_square([], "crop")


# --------------------------------------------------------------------------------------------------
# 2. Pixel parity with the original LLaVA code
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wh", SIZES_WH, ids=[f"{w}x{h}" for w, h in SIZES_WH])
def test_pixels_match_original(wh, hf_clip):
    width, height = wh
    image = Image.fromarray(make_image(width, height, seed=3))

    ours, plan = preprocess_anyres(image, PINPOINTS, "original")
    ref = process_anyres_image(image, hf_clip, PINPOINTS).numpy()
    assert ours.shape == ref.shape == (plan.num_crops, 3, S, S)
    assert np.array_equal(ours, ref)

    ours = preprocess_square(image, "pad", semantics="original")
    ref = process_images([image], hf_clip, SimpleNamespace(image_aspect_ratio="pad")).numpy()
    assert np.array_equal(ours, ref)


def test_hf_and_original_pick_transposed_grids_for_small_images():
    image = Image.fromarray(make_image(300, 200))
    hf, hf_plan = preprocess_anyres(image, PINPOINTS, "hf")
    orig, orig_plan = preprocess_anyres(image, PINPOINTS, "original")
    assert (hf_plan.rows, hf_plan.cols) == (1, 2) and (orig_plan.rows, orig_plan.cols) == (2, 1)
    assert np.array_equal(hf[0], orig[0])  # same base crop, different tiles
    assert not np.array_equal(hf[1:], orig[1:])


# --------------------------------------------------------------------------------------------------
# 3. Token counts and order against HF's processor and model, and the original merge
# --------------------------------------------------------------------------------------------------


def sweep_sizes(n: int = 2400, seed: int = 0) -> list[tuple[int, int]]:
    """(height, width) pairs: uniform, log-uniform, extreme aspect, small, and pinpoint-adjacent."""
    rng = np.random.default_rng(seed)
    k = n // 6
    sizes = [tuple(v) for v in rng.integers(1, 4001, size=(k, 2))]
    sizes += [tuple(v) for v in np.exp(rng.uniform(0, np.log(4000), size=(k, 2))).astype(int)]
    thin = np.stack([rng.integers(1, 25, size=k), rng.integers(1, 4001, size=k)], axis=1)
    sizes += [tuple(v) for v in thin] + [tuple(v[::-1]) for v in thin]
    sizes += [tuple(v) for v in rng.integers(1, 400, size=(k, 2))]
    near = rng.choice([336, 672, 1008, 448, 224, 1344], size=(k, 2)) + rng.integers(-3, 4, size=(k, 2))
    sizes += [tuple(v) for v in near]
    sizes += [(667, 1000), (336, 336), (899, 1024), (748, 352), (200, 300), (1, 1), (1, 4000), (4000, 1)]
    return [(int(h), int(w)) for h, w in sizes]


SWEEP = sweep_sizes()


@functools.cache
def next_config() -> LlavaNextConfig:
    return LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=S, patch_size=14),
                           image_grid_pinpoints=PINPOINTS)


def hf_packed(h: int, w: int, num_crops: int) -> np.ndarray:
    """HF LlavaNextModel.pack_image_features on features whose value is their flat row id."""
    config = next_config()
    features = torch.arange(num_crops * T, dtype=torch.float64).view(num_crops, T, 1)
    packed, lens = LlavaNextModel.pack_image_features(
        SimpleNamespace(config=config), [features], torch.tensor([[h, w]]),
        vision_feature_select_strategy="default", image_newline=torch.tensor([float(NEWLINE)], dtype=torch.float64))
    assert int(lens[0]) == packed[0].shape[0]
    return packed[0][:, 0].numpy()


class OriginalStub:
    """Just enough of a LlavaLlamaForCausalLM for llava_arch's prepare_inputs_labels_for_multimodal.

    The vision tower + projector are replaced by `encode_images`, which returns each feature row's
    flat id; token embeddings are a constant that never collides with ids or the newline (-1).
    """

    def __init__(self, pinpoints):
        self.config = SimpleNamespace(mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
                                      image_grid_pinpoints=pinpoints)
        tower = SimpleNamespace(num_patches_per_side=S // 14, config=SimpleNamespace(image_size=S))
        self.model = SimpleNamespace(
            image_newline=torch.tensor([float(NEWLINE)], dtype=torch.float64),
            embed_tokens=lambda ids: torch.full((ids.shape[0], 1), -7.0, dtype=torch.float64))
        self.get_vision_tower = lambda: tower
        self.get_model = lambda: self.model
        self.device = torch.device("cpu")

    def encode_images(self, images):
        return torch.arange(images.shape[0] * T, dtype=torch.float64).view(images.shape[0], T, 1)


def original_packed(h: int, w: int, num_crops: int) -> np.ndarray:
    input_ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 2]])
    images = [torch.zeros(num_crops, 1, 1, 1)]
    out = LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal(
        OriginalStub(PINPOINTS), input_ids, None, None, None, None, images, image_sizes=[(w, h)])
    embeds = out[4][0, :, 0].numpy()
    assert embeds[0] == -7.0 and embeds[-1] == -7.0
    return embeds[1:-1]


def test_token_counts_match_hf_processor_sweep(hf_processor):
    assert len(SWEEP) >= 2000
    mismatches = []
    for h, w in SWEEP:
        plan = anyres_plan(h, w, PINPOINTS, "hf")
        # LlavaNextProcessor.replace_image_token: features (incl. CLS) minus 1 for "default".
        expected = hf_processor._get_number_of_features(h, w, S, S) - 1
        crops = image_size_to_num_patches([h, w], PINPOINTS, S)
        if (plan.num_tokens, plan.num_crops) != (expected, crops) or plan.feature_index.shape != (expected,):
            mismatches.append((h, w, plan.num_tokens, expected, plan.num_crops, crops))
    assert not mismatches, mismatches[:10]


@pytest.mark.parametrize("semantics", ["hf", "original"])
def test_token_order_matches_the_reference_merge_sweep(semantics):
    # Count and order for the whole sweep against HF's pack_image_features or the original llava_arch merge
    # (on 1-wide features: cheap).
    packed = hf_packed if semantics == "hf" else original_packed
    mismatches = []
    for h, w in SWEEP:
        plan = anyres_plan(h, w, PINPOINTS, semantics)
        ref = packed(h, w, plan.num_crops)
        if not np.array_equal(plan.feature_index.astype(np.float64), ref):
            mismatches.append((h, w, plan.num_tokens, ref.shape[0]))
    assert not mismatches, mismatches[:10]


def test_sweep_hits_the_interesting_cases():
    # The sweep must exercise both unpad directions, rounding differences and grid transposition.
    plans = [(anyres_plan(h, w, PINPOINTS, "hf"), anyres_plan(h, w, PINPOINTS, "original")) for h, w in SWEEP]
    assert any(p.row_offset > 0 for p, _ in plans) and any(p.col_offset > 0 for p, _ in plans)
    assert any(p.num_tokens != o.num_tokens and (p.rows, p.cols) == (o.rows, o.cols) for p, o in plans)
    assert any((p.rows, p.cols) != (o.rows, o.cols) for p, o in plans)
    assert {(p.pin_h, p.pin_w) for p, _ in plans} == {tuple(p) for p in PINPOINTS}


def test_single_crop_layout_matches_both_references():
    plan = AnyResPlan.single_crop(500, 400)
    assert plan.num_crops == 1 and plan.num_tokens == T + 1
    assert np.array_equal(plan.feature_index.astype(np.float64), hf_packed(500, 400, 1))
    assert np.array_equal(AnyResPlan.single_crop(500, 400, "original").feature_index.astype(np.float64),
                          original_packed(500, 400, 1))


def test_processor_token_count_for_real_images(hf_processor):
    for w, h in [(1000, 667), (352, 748), (5, 3000), (1, 1)]:
        image = Image.fromarray(make_image(w, h))  # PIL: a (1, 1, 3) array would read as CHW in HF
        out = hf_processor(images=image, text="<image> hi", return_tensors="np")
        plan = anyres_plan(h, w, PINPOINTS, "hf")
        assert int((out["input_ids"] == 1).sum()) == plan.num_tokens
        assert out["pixel_values"].shape[1] == plan.num_crops


# --------------------------------------------------------------------------------------------------
# 4. Known values (docs/semantics.md)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "w, h, semantics, grid, tokens, crops",
    [(1000, 667, "hf", (2, 2), 2144, 5), (1000, 667, "original", (2, 2), 2144, 5),
     (336, 336, "hf", (1, 2), 1176, 3), (336, 336, "original", (2, 1), 1176, 3),
     (1024, 899, "hf", (2, 2), 2634, 5),
     (352, 748, "hf", (3, 1), 1876, 4), (352, 748, "original", (3, 1), 1826, 4),
     (300, 200, "hf", (1, 2), 1464, 3), (300, 200, "original", (2, 1), 976, 3)],
)
def test_known_values(w, h, semantics, grid, tokens, crops):
    plan = anyres_plan(h, w, PINPOINTS, semantics)
    assert ((plan.rows, plan.cols), plan.num_tokens, plan.num_crops) == (grid, tokens, crops)
    assert plan.num_tokens == T + plan.rows_kept * (plan.cols_kept + 1)
    assert plan.feature_index.dtype == np.int32 and plan.feature_index.shape == (tokens,)
    assert int((plan.feature_index == NEWLINE).sum()) == plan.rows_kept
    assert not plan.feature_index.flags.writeable


def test_select_best_resolution_semantics():
    assert select_best_resolution(200, 300, PINPOINTS, "hf") == (336, 672)
    assert select_best_resolution(200, 300, PINPOINTS, "original") == (672, 336)
    assert select_best_resolution(667, 1000, "[(336, 672), (672, 336), (672, 672)]", "hf") == (672, 672)
    for bad in ("torch", "HF", None):
        with pytest.raises(ValueError, match="semantics"):
            select_best_resolution(10, 10, PINPOINTS, bad)
        with pytest.raises(ValueError, match="semantics"):
            anyres_plan(10, 10, PINPOINTS, bad)
        with pytest.raises(ValueError, match="semantics"):
            preprocess_anyres(make_image(10, 10), PINPOINTS, bad)
    with pytest.raises(ValueError, match="multiples"):
        anyres_plan(10, 10, [[300, 600]])
    with pytest.raises(ValueError, match="positive"):
        anyres_plan(0, 10)

def test_bad_inputs(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="nope.png"):
        load_image(missing)
    with pytest.raises(ImageError, match="nope.png"):
        preprocess_anyres(str(missing))
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(ImageError, match=r"cannot read image file .*notes\.png"):
        load_image(str(text))
    with pytest.raises(ImageError, match="directory|not found"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match=r"zero-sized image array of shape \(0, 5, 3\)"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageError, match=r"\(7, 0\)"):
        preprocess_square(np.zeros((7, 0), np.uint8), "crop")
    with pytest.raises(ImageError, match=r"zero-sized image.*\(0, 4\)"):
        load_image(Image.new("RGB", (0, 4)))
    with pytest.raises(ImageError, match="float32"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match=r"\(4, 4, 2\)"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError):
        load_image(12345)
    with pytest.raises(ImageError, match="'La'"):  # PIL cannot convert La; HF fails too
        load_image(Image.new("RGBA", (3, 3)).convert("La"))
    assert issubclass(ImageError, ValueError)


# --------------------------------------------------------------------------------------------------
# 6. PIL modes, arrays and files: same pixels as HF for the same input
# --------------------------------------------------------------------------------------------------


def mode_images() -> dict[str, Image.Image]:
    rgb = Image.fromarray(make_image(61, 47, seed=5))
    rgba = Image.fromarray(make_image(61, 47, seed=5, channels=4))
    p_trans = rgb.quantize(16)
    p_trans.info["transparency"] = 3
    rng = np.random.default_rng(9)
    return {
        "RGBA": rgba, "LA": rgba.convert("LA"), "L": rgb.convert("L"), "P": rgb.quantize(32),
        "P+transparency": p_trans, "CMYK": rgb.convert("CMYK"), "1": rgb.convert("1"),
        "I;16": Image.fromarray(rng.integers(0, 65536, (47, 61), dtype=np.uint16)),
        "I": Image.fromarray(rng.integers(-50, 400, (47, 61)).astype(np.int32)),
        "F": Image.fromarray(rng.uniform(-10, 300, (47, 61)).astype(np.float32)),
        "RGBX": rgb.convert("RGBX"), "PA": rgba.convert("PA"), "LAB": rgb.convert("LAB"),
        "YCbCr": rgb.convert("YCbCr"), "HSV": rgb.convert("HSV"), "RGBa": rgba.convert("RGBa"),
    }


@pytest.mark.parametrize("name", list(mode_images()))
def test_pil_modes_match_hf(name, hf_clip, hf_next):
    image = mode_images()[name]
    assert image.mode == name.split("+")[0]
    assert np.array_equal(preprocess_square(image, "crop")[0], hf_pixels(hf_clip, image))
    assert np.array_equal(preprocess_anyres(image, PINPOINTS)[0], hf_pixels(hf_next, image))


def test_rgba_is_composited_on_white_not_dropped(hf_clip):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent: HF shows white
    rgb = np.asarray(load_image(Image.fromarray(rgba)))
    assert (rgb == 255).all()
    assert (np.asarray(load_image(Image.fromarray(rgba), "original")) == (200, 0, 0)).all()


@pytest.mark.parametrize("shape", [(47, 61, 3), (47, 61, 1), (47, 61, 4)])
def test_arrays_match_hf(shape, hf_clip, hf_next):
    array = np.ascontiguousarray(make_image(61, 47, seed=11, channels=4)[..., : shape[-1]])
    assert array.shape == shape
    kw = dict(input_data_format="channels_last")
    assert np.array_equal(preprocess_square(array, "crop")[0], hf_pixels(hf_clip, array, **kw))
    assert np.array_equal(preprocess_anyres(array, PINPOINTS)[0], hf_pixels(hf_next, array, **kw))
    if shape[-1] == 1:  # HF rejects 2-D arrays; ours reads them as HxWx1
        assert np.array_equal(preprocess_square(array[..., 0], "crop")[0], hf_pixels(hf_clip, array, **kw))


def test_files_match_hf(tmp_path, hf_clip, hf_next):
    # A path: HF loads with exif_transpose + convert("RGB") (alpha dropped, orientation applied);
    # an opened PIL image: no transpose, alpha composited on white. load_image mirrors both.
    rgba_path = tmp_path / "a.png"
    Image.fromarray(make_image(70, 40, seed=2, channels=4)).save(rgba_path)
    jpg_path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.fromarray(make_image(70, 40, seed=3)).save(jpg_path, exif=exif, quality=95)
    assert load_image(jpg_path).size == (40, 70)
    assert load_image(jpg_path, "original").size == (70, 40)
    assert load_image(Image.open(jpg_path)).size == (70, 40)
    for path in (rgba_path, jpg_path):
        assert np.array_equal(preprocess_square(path, "crop")[0], hf_pixels(hf_clip, str(path)))
        assert np.array_equal(preprocess_anyres(str(path), PINPOINTS)[0], hf_pixels(hf_next, str(path)))
        opened = Image.open(path)
        assert np.array_equal(preprocess_square(opened, "crop")[0], hf_pixels(hf_clip, Image.open(path)))
    # Original scripts: Image.open(path).convert("RGB"), no EXIF transpose.
    orig = process_anyres_image(Image.open(jpg_path).convert("RGB"), hf_clip, PINPOINTS).numpy()
    assert np.array_equal(preprocess_anyres(jpg_path, PINPOINTS, "original")[0], orig)
