"""Examples -> training batches with static shapes.

Each example is tokenized once (`tokenize_examples`: ids with one image placeholder, labels with -100 on what is
not supervised) and its image's feature count is computed from its size, so that the length after expansion is
known before training starts: a row longer than `max_length` is refused with a `DataError` naming it (skipped
with `skip_bad`), or cut to `max_length` as the original model does (`truncate`: `llava_arch` truncates the
embeddings after inserting the image features, which may cut into the image).

A batch (`Collator`) expands each placeholder into the image's feature rows (the image token, labels -100), pads
rows on the right (as the original trainer) to a length bucket and the images' crops, feature rows and the
supervised targets to buckets too, so that an epoch compiles a handful of step programs, one per
(length, crops, features, targets) bucket combination.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..batch import ImageCrops, make_batch, prompt_bucket
from ..config import ORIGINAL_IMAGE_TOKEN_INDEX
from ..image import load_image
from ..prompt import expand_image_tokens
from .data import DataError, Example
from .labels import IGNORE_INDEX, build_example
from .loss import LossBatch, loss_batch


@dataclass(frozen=True)
class TokenizedExample:
    """An example's ids (one ORIGINAL_IMAGE_TOKEN_INDEX placeholder where its image goes) and labels."""

    example: Example
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where not supervised
    image_tokens: int  # the image's feature count (0 without image)

    @property
    def targets(self) -> int:
        """Supervised tokens (labels that are not IGNORE_INDEX)."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def length(self) -> int:
        """Tokens after the image placeholder is expanded."""
        return len(self.input_ids) - (1 if self.image_tokens else 0) + self.image_tokens


def image_token_count(model, path: str) -> int:
    """How many feature rows the model makes of the image at `path` (from its size: AnyRes plan for NeXT)."""
    if model.config.model_type == "llava":
        return model.config.tokens_per_crop
    rgb = load_image(path, model.config.semantics)
    return model.plan_image(rgb.height, rgb.width).num_tokens


def tokenize_examples(model, examples: list[Example], template: str, max_length: int, *, skip_bad: bool = False,
                      truncate: bool = False, progress: bool = True) -> tuple[list[TokenizedExample], list[str]]:
    """Tokenize every example; returns (examples kept, one message per example skipped).

    A row longer than `max_length` after image expansion raises DataError naming it, unless `truncate` (it is
    cut later, in the batch) or `skip_bad` (it is skipped and reported). A row with nothing supervised left is
    refused the same way."""
    kept, skipped = [], []
    for ex in tqdm(examples, desc="tokenize", unit="ex", disable=not progress, leave=False):
        try:
            ids, labels = build_example(ex.conversations, model.tokenizer, template, ex.image is not None,
                                        max_length)
            count = image_token_count(model, ex.image) if ex.image is not None else 0
            item = TokenizedExample(ex, np.asarray(ids, np.int32), np.asarray(labels, np.int32), count)
            if item.length > max_length and not truncate:
                raise DataError(f"row {ex.row} (id {ex.id!r}): {item.length} tokens after expanding the image "
                                f"({count} features) exceed --max-length {max_length}; raise it, pass --truncate "
                                "to cut such rows as the original code does, or --skip-bad to skip them")
            if not (_expanded_labels(item)[1: max_length] != IGNORE_INDEX).any():
                raise DataError(f"row {ex.row} (id {ex.id!r}): no supervised token within --max-length "
                                f"{max_length}")
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        kept.append(item)
    if not kept:
        raise DataError("no usable example in the data set" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return kept, skipped


def _expanded_labels(item: TokenizedExample) -> np.ndarray:
    at = np.flatnonzero(item.input_ids == ORIGINAL_IMAGE_TOKEN_INDEX)
    if not item.image_tokens or not len(at):
        return item.labels
    k = int(at[0])
    return np.concatenate([item.labels[:k], np.full(item.image_tokens, IGNORE_INDEX, np.int32), item.labels[k + 1:]])


def _small_bucket(n: int) -> int:
    """A count rounded up to 1, 2, ..., 8, then steps of an eighth of the octave (12, 14, 16, 20, 24, ...)."""
    return prompt_bucket(n, minimum=1, fine_above=8, steps_per_octave=4)


class Collator:
    """`TokenizedExample`s -> a `LossBatch` of `batch_size` rows (missing rows are dummy rows with no target).

    target_bucket: the number of target slots of every batch (default: a bucket of each batch's own count);
    `for_examples` sets it from the data set's longest answer, so that it never adds a program shape."""

    def __init__(self, model, batch_size: int, max_length: int, target_bucket: int | None = None):
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        self.target_bucket = target_bucket

    @classmethod
    def for_examples(cls, model, items: list[TokenizedExample], batch_size: int, max_length: int) -> Collator:
        most = max(it.targets for it in items)
        return cls(model, batch_size, max_length, prompt_bucket(batch_size * most, minimum=8))

    def __call__(self, items: list[TokenizedExample]) -> LossBatch:
        cfg = self.model.config
        rows, label_rows, images = [], [], []
        for item in items:
            ids, labels = item.input_ids.tolist(), _expanded_labels(item)
            image = None
            if item.image_tokens:
                processed = self.model.processor.process_image(item.example.image)
                image = ImageCrops.create(cfg, processed.crops, processed.plan)
                ids = expand_image_tokens(ids, [image.num_features], cfg.image_token_id,
                                          placeholder_id=ORIGINAL_IMAGE_TOKEN_INDEX)
            if len(ids) > self.max_length:  # truncate=True: cut after expansion, as the original's llava_arch
                cut = sum(1 for t in ids[self.max_length:] if t == cfg.image_token_id) if image else 0
                ids, labels = ids[: self.max_length], labels[: self.max_length]
                if image is not None:
                    kept = image.num_features - cut
                    image = ImageCrops(image.crops, image.feature_index[:kept], image.padded_length) if kept else None
            if image is not None:
                images.append(image)
            rows.append(ids)
            label_rows.append(labels)
        seq = prompt_bucket(max(map(len, rows)))
        ids = np.zeros((len(rows), seq), np.int32)
        mask = np.zeros((len(rows), seq), bool)
        labels = np.full((len(rows), seq), IGNORE_INDEX, np.int32)
        for b, (r, lab) in enumerate(zip(rows, label_rows, strict=True)):  # right padding, as the original trainer
            ids[b, : len(r)], mask[b, : len(r)], labels[b, : len(r)] = r, True, lab
        batch = make_batch(ids, mask, images, cfg.image_token_id, rows_multiple=self.batch_size)
        lb = loss_batch(batch, labels, cfg.tokens_per_crop, self.target_bucket)
        return _pad_images(lb, len(batch.input_ids) * seq)


def _pad_images(lb: LossBatch, drop: int) -> LossBatch:
    """Crops padded with zero crops and feature rows with dropped rows, each to a bucket."""
    crops, index, where = np.asarray(lb.crops), np.asarray(lb.feature_index), np.asarray(lb.feature_positions)
    if len(crops) == 0:
        return lb
    n_crops, n_feat = _small_bucket(len(crops)), prompt_bucket(len(index), minimum=64)
    crops = np.concatenate([crops, np.zeros((n_crops - len(crops), *crops.shape[1:]), np.float32)])
    index = np.concatenate([index, np.zeros(n_feat - len(index), np.int32)])
    where = np.concatenate([where, np.full(n_feat - len(where), drop, np.int32)])
    return lb.replace(crops=crops, feature_index=index, feature_positions=where)
