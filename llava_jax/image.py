"""Host-side image preprocessing for LLaVA-1.5 and LLaVA-NeXT (numpy + PIL only).

Everything here mirrors a reference pixel for pixel:

* ``semantics="hf"``: transformers 5 PIL-backend processors (``CLIPImageProcessorPil``,
  ``LlavaImageProcessorPil``, ``LlavaNextImageProcessorPil``) and ``LlavaNextModel.pack_image_features``.
* ``semantics="original"``: the LLaVA authors' code (``llava.mm_utils`` with an HF CLIP processor,
  ``llava.model.llava_arch`` spatial_unpad merge).

Resizing is PIL bicubic on uint8 RGB images, as both references do; rescale and normalize follow
``transformers.image_transforms`` (float64 rescale, cast to float32, float32 normalize) so results
are bit-identical, not merely close.

The AnyRes "plan" turns an image size into plain integers plus an index array (``feature_index``)
that tells the device-side model how to gather vision features into the packed sequence
(``spatial_unpad``: base crop, then the unpadded tile grid row by row with an ``image_newline`` after each
row; ``flat``: the crops' features one after the other).

Every crop goes through the CLIP processor steps: shortest edge resized to ``resize`` (the processor's
``size``; the crop size unless a config says otherwise), then a center crop to ``crop_size``.
"""

from __future__ import annotations

import ast
import math
import os
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageOps

from .errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Original `expand2square` (and HF `LlavaImageProcessor(do_pad=True)`) background: (122, 116, 104).
PAD_COLOR = tuple(int(x * 255) for x in CLIP_MEAN)
# The released LLaVA-NeXT (1.6) grid pinpoints, as stored in both HF and original configs.
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
SEMANTICS = ("hf", "original")
NEWLINE = -1  # feature_index value meaning "insert the image_newline vector here"

_MEAN32 = np.array(CLIP_MEAN, dtype=np.float32)
_STD32 = np.array(CLIP_STD, dtype=np.float32)
_SINGLE_SOURCE = (str, os.PathLike, Image.Image, np.ndarray)


class ImageError(InputError):
    """An image source that cannot be turned into an RGB image (unreadable, empty, bad layout)."""


def _check_semantics(semantics: str) -> None:
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")


# --------------------------------------------------------------------------------------------------
# Loading and RGB conversion
# --------------------------------------------------------------------------------------------------


def _hf_pil_to_rgb(image: Image.Image) -> Image.Image:
    # transformers.image_transforms.convert_to_rgb (what PilBackend.process_image calls on a PIL
    # image): any image with an "A" band or a `transparency` entry is composited onto white
    # (note: this includes mode "LAB", whose bands are L, A, B); everything else is a plain convert.
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    # Arrays are always read as HWC (or HW). HF guesses CHW vs HWC from the shape; we do not.
    if array.size == 0:
        raise ImageError(f"zero-sized image array of shape {array.shape}")
    if array.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8 (HWC or HW), got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ImageError(
            f"image array must be HW or HWC with 1, 3 or 4 channels, got shape {array.shape}"
        )
    channels = array.shape[-1]
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    elif channels == 4:
        # Same float64 blend onto white and round-half-even as HF's numpy convert_to_rgb.
        alpha = array[..., 3:4] / 255
        composite = alpha * array[..., :3] + (1 - alpha) * 255
        array = np.round(composite).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def _check_pil_size(image: Image.Image, what: str) -> None:
    if image.width <= 0 or image.height <= 0:
        raise ImageError(f"zero-sized image {what}: size (width, height) = {image.size}")


# Modes whose values can exceed 255: PIL's (and so HF's) RGB conversion clips them, saturating to white.
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _warn_if_saturated(image: Image.Image, what: str) -> None:
    """Warn when the RGB conversion will clip values above 255 (e.g. a 16-bit grayscale PNG). The pixels
    are kept as PIL and HF make them, for parity; the warning says how to get the intended image."""
    if image.mode in _HIGH_BIT_DEPTH_MODES and np.asarray(image).max() > 255:  # getextrema fails on "I;16B"
        warnings.warn(
            f"image{' ' + what if what else ''} has mode {image.mode!r} with values above 255: converting it to RGB clips them to 255, "
            "as PIL and transformers do (a 16-bit grayscale PNG comes out mostly white). Scale it to 8 bits "
            "first for the intended picture, e.g. Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))",
            stacklevel=3,
        )


def load_image(source, semantics: str = "hf") -> Image.Image:
    """Load ``source`` as an RGB ``PIL.Image`` the way the chosen reference would see it.

    Args:
      source: a PIL image, a uint8 numpy array (HWC with 1/3/4 channels, or HW grayscale),
        or a ``str`` / ``os.PathLike`` path to an image file.
      semantics: ``"hf"`` mirrors what a transformers 5 PIL processor does with the same input:
        a path goes through ``transformers.image_utils.load_image`` (EXIF orientation applied,
        then ``convert("RGB")``, which drops alpha); an in-memory PIL image goes through
        ``convert_to_rgb`` (no EXIF transpose, alpha composited onto white).
        ``"original"`` mirrors the LLaVA scripts: ``Image.open(path).convert("RGB")`` (no EXIF
        transpose, alpha dropped), and ``image.convert("RGB")`` for PIL images.
        Arrays are converted like HF's numpy path in both cases (4 channels blend onto white).

    Images with values above 255 (16-bit grayscale PNGs, modes "I;16", "I", "F") are converted as PIL and
    HF convert them, clipped to 255, with a warning. Files larger than PIL's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS`` x 2) are refused; URLs are fetched by ``url_image.fetch_image``.

    Raises:
      ImageError: unreadable or missing file, zero-sized image, unsupported array layout or mode.
    """
    _check_semantics(semantics)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ImageError(f"image file not found: {path!r}")
        try:
            image = Image.open(path)
            image.load()  # decode now so that truncated files fail here, naming the path
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise ImageError(f"cannot read image file {path!r}: {e}") from e
        _check_pil_size(image, f"in file {path!r}")
        if semantics == "hf":
            image = ImageOps.exif_transpose(image)
        convert = lambda im: im.convert("RGB")  # noqa: E731
    elif isinstance(source, Image.Image):
        image = source
        _check_pil_size(image, f"of mode {image.mode}")
        convert = _hf_pil_to_rgb if semantics == "hf" else (lambda im: im.convert("RGB"))
    elif isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    else:
        raise TypeError(f"unsupported image source type {type(source).__name__}")
    _warn_if_saturated(image, f"in file {os.fspath(source)!r}" if isinstance(source, (str, os.PathLike)) else "")
    try:
        return convert(image)
    except ValueError as e:  # e.g. a mode PIL cannot convert ("La")
        raise ImageError(f"cannot convert image of mode {image.mode!r} to RGB: {e}") from e


# --------------------------------------------------------------------------------------------------
# Pixel steps shared by all pipelines
# --------------------------------------------------------------------------------------------------


def _normalize(crops: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), bit-identical to HF rescale + normalize."""
    x = (crops.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - _MEAN32) / _STD32
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _resize_shortest_edge(image: Image.Image, size: int) -> Image.Image:
    # transformers.image_transforms.get_resize_output_image_size(default_to_square=False):
    # the long side is truncated, int(size * long / short).
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def _center_crop(array: np.ndarray, size: int) -> np.ndarray:
    # After a shortest-edge resize to `resize` >= `size` both sides are >= size, so HF's pad branch never runs.
    height, width = array.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return array[top : top + size, left : left + size]


def _clip_steps(image: Image.Image, crop_size: int, resize: int | None) -> np.ndarray:
    """The CLIP processor's geometry: shortest edge -> ``resize`` (default ``crop_size``), center crop."""
    resize = crop_size if resize is None else resize
    if resize < crop_size:
        raise ValueError(f"resize {resize} is smaller than crop_size {crop_size} (the center crop would pad)")
    return _center_crop(np.asarray(_resize_shortest_edge(image, resize)), crop_size)


def expand2square(image: Image.Image, background=PAD_COLOR) -> Image.Image:
    """Original LLaVA ``expand2square``: paste centered (floor offset) on a square of ``background``.

    HF ``LlavaImageProcessorPil(do_pad=True).pad_to_square`` gives the same pixels for RGB input
    (same color from the CLIP mean, same ``(max - side) // 2`` offset).
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def _as_list(images) -> list:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)  # a batch of HWC arrays
    if isinstance(images, _SINGLE_SOURCE):
        return [images]
    return list(images)


def preprocess_square(images, mode: str, crop_size: int = 336, semantics: str = "hf",
                      resize: int | None = None) -> np.ndarray:
    """LLaVA-1.5 preprocessing: one ``crop_size`` square per image, float32 ``(N, 3, crop, crop)``.

    Args:
      images: one image source (see ``load_image``) or a sequence of them (or an (N, H, W, C) array).
      mode: ``"crop"``: CLIP processor (shortest edge -> ``crop_size`` bicubic, center crop), what the
        llava-hf 1.5 processors ship. ``"pad"``: the original ``image_aspect_ratio="pad"``
        (``expand2square`` on ``PAD_COLOR``, then the CLIP steps), equal to HF
        ``LlavaImageProcessor(do_pad=True)``.
      crop_size: CLIP input size (336 for ViT-L/14-336).
      semantics: only decides how non-RGB inputs and paths are loaded (see ``load_image``).
      resize: the processor's shortest-edge ``size`` before the center crop (None: ``crop_size``).
    """
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    sources = _as_list(images)
    if not sources:
        raise ValueError("no images given")
    out = np.empty((len(sources), crop_size, crop_size, 3), dtype=np.uint8)
    for i, source in enumerate(sources):
        image = load_image(source, semantics)
        if mode == "pad":
            image = expand2square(image, PAD_COLOR)
        out[i] = _clip_steps(image, crop_size, resize)
    return _normalize(out)


# --------------------------------------------------------------------------------------------------
# AnyRes (LLaVA-NeXT)
# --------------------------------------------------------------------------------------------------


def _parse_pinpoints(pinpoints) -> list[tuple[int, int]]:
    if isinstance(pinpoints, str):  # the original accepts a Python-literal string
        pinpoints = ast.literal_eval(pinpoints)
    pairs = [tuple(int(v) for v in p) for p in pinpoints]
    if not pairs or any(len(p) != 2 or min(p) <= 0 for p in pairs):
        raise ValueError(f"pinpoints must be a non-empty list of positive pairs, got {pinpoints!r}")
    return pairs


def select_best_resolution(height: int, width: int, pinpoints, semantics: str = "hf") -> tuple[int, int]:
    """Pick the grid pinpoint for an image, returned as ``(pin_h, pin_w)``.

    ``pinpoints`` is the config list (``[[a, b], ...]``). HF reads each pair as (h, w); the original
    reads the same list as (w, h). Both then maximize ``min(int(w*s) * int(h*s), w*h)`` with
    ``s = min(pin_w / w, pin_h / h)`` and break ties on less waste, strictly, so the first wins.
    """
    _check_semantics(semantics)
    height, width = int(height), int(width)  # python ints/floats: numpy scalars must not change the math
    best, best_effective, best_wasted = None, 0, float("inf")
    for a, b in _parse_pinpoints(pinpoints):
        pin_h, pin_w = (a, b) if semantics == "hf" else (b, a)
        # Same expression order as both references (float results must match bit for bit).
        scale = min(pin_w / width, pin_h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pin_h, pin_w), effective, wasted
    return best


def _fit_size(height: int, width: int, pin_h: int, pin_w: int) -> tuple[int, int]:
    # HF get_patch_output_size == original resize_and_pad_image: ceil on the scaled side, capped.
    scale_w, scale_h = pin_w / width, pin_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), pin_h), pin_w
    return pin_h, min(math.ceil(width * scale_h), pin_w)


def _unpad(height: int, width: int, cur_h: int, cur_w: int, semantics: str) -> tuple[int, int, int, int]:
    """(row_offset, col_offset, rows_kept, cols_kept) of `unpad_image` on a (cur_h, cur_w) grid."""
    if width / height > cur_w / cur_h:
        scaled = height * (cur_w / width)
        new_h = int(round(scaled, 7)) if semantics == "hf" else int(scaled)  # HF rounds, original truncates
        pad = (cur_h - new_h) // 2
        return pad, 0, cur_h - 2 * pad, cur_w
    scaled = width * (cur_h / height)
    new_w = int(round(scaled, 7)) if semantics == "hf" else int(scaled)
    pad = (cur_w - new_w) // 2
    return 0, pad, cur_h, cur_w - 2 * pad


@dataclass(frozen=True)
class AnyResPlan:
    """Everything about one AnyRes image that is decided by its size alone (plain ints).

    Crops are ``[base] + tiles`` with tiles row-major over a ``rows x cols`` grid of the pinpoint.
    The tile features form a ``(rows * t, cols * t)`` grid (``t = crop_size // patch_size``), of which
    ``rows_kept x cols_kept`` starting at ``(row_offset, col_offset)`` survive ``unpad_image``.
    ``num_tokens = t*t + rows_kept * (cols_kept + 1)`` (one newline per kept row); the one-crop
    case (``num_crops == 1``, see ``single_crop``) is ``t*t + 1`` in both references.

    ``merge="flat"`` (the original ``mm_patch_merge_type: flat``): the crops' features one after the other,
    base first, nothing removed and no newline: ``num_tokens = num_crops * t*t``.
    """

    height: int
    width: int
    semantics: str
    crop_size: int
    patch_size: int
    pin_h: int
    pin_w: int
    rows: int
    cols: int
    num_crops: int
    resized_h: int  # the image inside the pinpoint canvas, before black padding
    resized_w: int
    pad_top: int
    pad_left: int
    row_offset: int
    col_offset: int
    rows_kept: int
    cols_kept: int
    num_tokens: int
    merge: str = "spatial_unpad"

    @property
    def tokens_per_side(self) -> int:
        return self.crop_size // self.patch_size

    @property
    def tokens_per_crop(self) -> int:
        return self.tokens_per_side**2

    @classmethod
    def single_crop(cls, height: int, width: int, semantics: str = "hf", crop_size: int = 336,
                    patch_size: int = 14) -> AnyResPlan:
        """Plan for an image given to a spatial_unpad model as a single crop.

        Both references then emit the crop's features followed by one newline. (HF's processor
        never produces this: it always emits a base plus at least one tile.)
        """
        _check_semantics(semantics)
        t = crop_size // patch_size
        return cls(height, width, semantics, crop_size, patch_size, crop_size, crop_size, 0, 0, 1,
                   crop_size, crop_size, 0, 0, 0, 0, 0, 0, t * t + 1)

    @cached_property
    def feature_index(self) -> np.ndarray:
        """int32 ``(num_tokens,)``: for each output token, its row in
        ``features.reshape(num_crops * tokens_per_crop, dim)``, or ``NEWLINE`` (-1) for image_newline.

        Matches HF ``pack_image_features`` and the original spatial_unpad merge: base crop tokens
        first, then the unpadded grid row by row, each row followed by a newline.
        """
        t, tpc = self.tokens_per_side, self.tokens_per_crop
        if self.merge == "flat":
            index = np.arange(self.num_crops * tpc)
        elif self.num_crops == 1:
            index = np.append(np.arange(tpc), NEWLINE)
        else:
            r = np.arange(self.row_offset, self.row_offset + self.rows_kept)[:, None]
            c = np.arange(self.col_offset, self.col_offset + self.cols_kept)[None, :]
            tile = (r // t) * self.cols + (c // t)  # row-major tile number
            grid = tpc * (1 + tile) + (r % t) * t + (c % t)  # +1: crop 0 is the base image
            grid = np.concatenate([grid, np.full((self.rows_kept, 1), NEWLINE)], axis=1)
            index = np.concatenate([np.arange(tpc), grid.ravel()])
        index = index.astype(np.int32)
        index.setflags(write=False)  # cached and shared: keep it immutable
        assert index.shape == (self.num_tokens,)
        return index


def anyres_plan(height: int, width: int, pinpoints=DEFAULT_PINPOINTS, semantics: str = "hf",
                crop_size: int = 336, patch_size: int = 14, merge: str = "spatial_unpad") -> AnyResPlan:
    """Compute the AnyRes layout (grid, crops, unpadded feature grid, token order) for an image size.

    Args:
      height, width: the image size in pixels (after RGB loading, i.e. what the processor sees).
      pinpoints: config ``image_grid_pinpoints`` (multiples of ``crop_size``), read per ``semantics``.
      semantics: ``"hf"`` (transformers 5) or ``"original"`` (llava-torch 1.2.2).
      merge: ``"spatial_unpad"`` (LLaVA-NeXT) or ``"flat"`` (original ``anyres`` + ``flat``: crops in order).
    """
    _check_semantics(semantics)
    if merge not in ("spatial_unpad", "flat"):
        raise ValueError(f"merge must be 'spatial_unpad' or 'flat', got {merge!r}")
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if crop_size % patch_size:
        raise ValueError(f"crop_size {crop_size} is not a multiple of patch_size {patch_size}")
    pairs = _parse_pinpoints(pinpoints)
    if any(v % crop_size for p in pairs for v in p):
        # HF counts ceil-many tiles but reshapes with floor-many: non-multiples break both references.
        raise ValueError(f"pinpoints must be multiples of crop_size {crop_size}, got {pairs}")
    pin_h, pin_w = select_best_resolution(height, width, pairs, semantics)
    rows, cols = pin_h // crop_size, pin_w // crop_size
    resized_h, resized_w = _fit_size(height, width, pin_h, pin_w)
    t = crop_size // patch_size
    row_offset, col_offset, rows_kept, cols_kept = _unpad(height, width, rows * t, cols * t, semantics)
    return AnyResPlan(
        height=height, width=width, semantics=semantics, crop_size=crop_size, patch_size=patch_size,
        pin_h=pin_h, pin_w=pin_w, rows=rows, cols=cols, num_crops=rows * cols + 1,
        resized_h=resized_h, resized_w=resized_w,
        pad_top=(pin_h - resized_h) // 2, pad_left=(pin_w - resized_w) // 2,
        row_offset=row_offset, col_offset=col_offset, rows_kept=rows_kept, cols_kept=cols_kept,
        num_tokens=t * t * (rows * cols + 1) if merge == "flat" else t * t + rows_kept * (cols_kept + 1),
        merge=merge,
    )


def preprocess_anyres(image, pinpoints=DEFAULT_PINPOINTS, semantics: str = "hf", crop_size: int = 336,
                      patch_size: int = 14, resize: int | None = None,
                      merge: str = "spatial_unpad") -> tuple[np.ndarray, AnyResPlan]:
    """LLaVA-NeXT AnyRes preprocessing: float32 ``(num_crops, 3, crop, crop)`` and its ``AnyResPlan``.

    Crop 0 is the whole image squashed to ``crop x crop`` (plain bicubic resize, no aspect kept);
    then the tiles of the pinpoint canvas (aspect-preserving bicubic resize, black padding centered
    with the odd pixel right/bottom), row-major. Pixel-identical to ``LlavaNextImageProcessorPil``
    (``"hf"``) and to ``llava.mm_utils.process_anyres_image`` with an HF CLIP-336 processor
    (``"original"``); the two differ only where they choose a different pinpoint.

    With ``resize`` (the processor's shortest-edge ``size``) other than ``crop_size``, both references squash
    the base image to ``resize x resize`` instead, and put every crop (base and tiles) through the CLIP steps:
    shortest edge -> ``resize``, center crop -> ``crop_size``. ``merge`` only changes the plan.
    """
    _check_semantics(semantics)
    rgb = load_image(image, semantics)
    plan = anyres_plan(rgb.height, rgb.width, pinpoints, semantics, crop_size, patch_size, merge)
    canvas = np.zeros((plan.pin_h, plan.pin_w, 3), dtype=np.uint8)
    resized = np.asarray(rgb.resize((plan.resized_w, plan.resized_h), Image.Resampling.BICUBIC))
    canvas[plan.pad_top : plan.pad_top + plan.resized_h, plan.pad_left : plan.pad_left + plan.resized_w] = resized
    c = crop_size
    tiles = canvas.reshape(plan.rows, c, plan.cols, c, 3).swapaxes(1, 2).reshape(-1, c, c, 3)
    if resize is None or resize == c:
        base = np.asarray(rgb.resize((c, c), Image.Resampling.BICUBIC))
        return _normalize(np.concatenate([base[None], tiles])), plan
    base = _clip_steps(rgb.resize((resize, resize), Image.Resampling.BICUBIC), c, resize)
    tiles = [_clip_steps(Image.fromarray(tile), c, resize) for tile in tiles]
    return _normalize(np.stack([base, *tiles])), plan
