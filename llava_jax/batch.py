"""Host-side batch preparation: token rows and processed images -> the arrays the engine's programs take.

Prompts are left-padded to a length bucket (`prompt_bucket`); each image keeps its crops and its packing index
(`feature_index`, see network.py) and is given the flat positions of its image tokens in the padded batch
(`feature_positions`), both padded to a length that depends on the image's AnyRes pinpoint only, so that the
program that encodes it is compiled once per pinpoint, whatever the exact image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import LlavaConfig
from .errors import InputError
from .image import AnyResPlan


def prompt_bucket(length: int, minimum: int = 64, fine_above: int = 1024, steps_per_octave: int = 8) -> int:
    """Padded prompt length: the next power of two >= length (at least `minimum`); above `fine_above`, the next
    multiple of 1/`steps_per_octave` of the octave, so that a long prompt (a LLaVA-NeXT image alone is 2-3 k
    tokens) computes at most 12.5% of padding rather than up to 100% (2200 tokens: 2304, not 4096)."""
    length = max(1, int(length))
    power = 1 << (length - 1).bit_length()
    if power <= fine_above:
        return max(minimum, power)
    step = power // (2 * steps_per_octave)
    return -(-length // step) * step


def cache_bucket(length: int, granule: int = 256) -> int:
    """KV cache length: the next multiple of `granule` >= length."""
    return -(-int(length) // granule) * granule


@dataclass(frozen=True)
class ImageCrops:
    """One preprocessed image: its crops and which encoder feature rows it contributes, in sequence order."""

    crops: np.ndarray  # (num_crops, 3, size, size) float32
    feature_index: np.ndarray  # (num_features,) int32: rows of the flattened encoder output, -1 = image_newline
    padded_length: int  # feature rows computed by the image's program (the same for every size of its pinpoint)

    @property
    def num_features(self) -> int:
        return len(self.feature_index)

    @classmethod
    def create(cls, config: LlavaConfig, crops: np.ndarray, plan: AnyResPlan | None) -> ImageCrops:
        """From a processed image: `plan` None for LLaVA-1.5 (one crop, every feature in order)."""
        if plan is None:
            index, num_crops, padded = np.arange(config.tokens_per_crop), 1, config.tokens_per_crop
        else:
            t = plan.tokens_per_side
            index, num_crops = plan.feature_index, plan.num_crops
            padded = plan.tokens_per_crop + plan.rows * t * (plan.cols * t + 1) + 1  # every row and column kept
        crops = np.asarray(crops, np.float32)
        if len(crops) < num_crops:
            raise InputError(f"the image needs {num_crops} crops, {len(crops)} were given")
        return cls(crops[:num_crops], np.asarray(index, np.int32), padded)


@dataclass(frozen=True)
class PlacedImage:
    """An image placed in a batch: what `GenerationEngine.insert_images` takes."""

    crops: np.ndarray
    feature_index: np.ndarray  # (padded_length,) int32
    feature_positions: np.ndarray  # (padded_length,) int32: flat batch * seq index; batch * seq = padding


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded token rows with their images placed; `rows` real rows, then dummy rows (padding)."""

    input_ids: np.ndarray  # (batch, seq) int32
    attention_mask: np.ndarray  # (batch, seq) bool
    positions: np.ndarray  # (batch, seq) int32
    images: list[PlacedImage]
    rows: int

    def stacked_images(self, tokens_per_crop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every image of the batch in one set of arrays, as `LlavaNetwork.__call__` takes them: (crops (n, 3,
        size, size), feature_index into the flattened encoder output of all crops, feature_positions)."""
        if not self.images:
            return np.zeros((0, 3, 1, 1), np.float32), np.zeros(0, np.int32), np.zeros(0, np.int32)
        offsets = np.cumsum([0] + [len(im.crops) for im in self.images[:-1]]) * tokens_per_crop
        index = [np.where(im.feature_index < 0, -1, im.feature_index + off) for im, off in zip(self.images, offsets,
                                                                                                strict=True)]
        return (np.concatenate([im.crops for im in self.images]), np.concatenate(index).astype(np.int32),
                np.concatenate([im.feature_positions for im in self.images]))


def place_images(input_ids: np.ndarray, images: list[ImageCrops], image_token_id: int) -> list[PlacedImage]:
    """Give each image, in order, the next `num_features` image tokens of the flattened (row-major) ids."""
    flat = np.flatnonzero(np.asarray(input_ids).reshape(-1) == image_token_id)
    wanted = sum(im.num_features for im in images)
    if wanted != len(flat):
        raise InputError(f"image features and image tokens do not match: input_ids hold {len(flat)} image tokens "
                         f"(id {image_token_id}), the images give {wanted} features")
    drop = np.asarray(input_ids).size
    placed, start = [], 0
    for im in images:
        index = np.zeros(im.padded_length, np.int32)
        index[: im.num_features] = im.feature_index
        positions = np.full(im.padded_length, drop, np.int32)
        positions[: im.num_features] = flat[start: start + im.num_features]
        start += im.num_features
        placed.append(PlacedImage(im.crops, index, positions))
    return placed


def make_batch(input_ids, attention_mask, images: list[ImageCrops], image_token_id: int, rows_multiple: int = 1,
               positions=None) -> PromptBatch:
    """A batch from padded arrays; dummy rows (a one-token prompt) are appended up to a multiple of
    `rows_multiple` (a mesh's data axis). positions default to cumsum(attention_mask) - 1."""
    ids = np.asarray(input_ids, np.int32)
    mask = np.asarray(attention_mask, bool)
    rows, seq = ids.shape
    total = -(-rows // rows_multiple) * rows_multiple
    if positions is None:
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    positions = np.asarray(positions, np.int32)
    if total > rows:
        extra = total - rows
        ids = np.concatenate([ids, np.zeros((extra, seq), np.int32)])
        dummy = np.zeros((extra, seq), bool)
        dummy[:, -1] = True
        mask = np.concatenate([mask, dummy])
        positions = np.concatenate([positions, np.zeros((extra, seq), np.int32)])
    return PromptBatch(ids, mask, positions, place_images(ids, images, image_token_id), rows)


def left_pad(rows: list[list[int]], bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> (ids, attention_mask), each (len(rows), bucket), left-padded with 0 / False."""
    ids = np.zeros((len(rows), bucket), np.int32)
    mask = np.zeros((len(rows), bucket), bool)
    for b, row in enumerate(rows):
        if row:
            ids[b, bucket - len(row):] = row
            mask[b, bucket - len(row):] = True
    return ids, mask
