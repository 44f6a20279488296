"""From images and text to model inputs: pixel values, AnyRes plans, and token ids with image tokens expanded.

Two tokenization semantics, as the two references do it:
- "hf" (llava-hf checkpoints, whose tokenizer has an `<image>` token): `<image>` is repeated once per feature
  in the text, then the whole text is tokenized (`LlavaProcessor` / `LlavaNextProcessor`);
- "original" (or a tokenizer without an `<image>` token): the original `tokenizer_image_token`, chunk by chunk
  around the markers, then each placeholder is expanded to the image's feature count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ORIGINAL_IMAGE_TOKEN_INDEX, LlavaConfig
from .image import AnyResPlan, load_image, preprocess_anyres, preprocess_square
from .prompt import IMAGE_MARKER, PromptError, expand_image_tokens, tokenizer_image_token


@dataclass
class ProcessedImage:
    """One image ready for the vision tower: its crops, its plan (None for LLaVA-1.5) and token count."""

    crops: np.ndarray  # (num_crops, 3, size, size) float32
    plan: AnyResPlan | None
    num_tokens: int
    size: tuple[int, int]  # (height, width) of the RGB image


class LlavaProcessor:
    """Images + text -> the arrays HF's processor returns (`__call__`), or ids + crops for `generate`."""

    def __init__(self, config: LlavaConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        self.image_token_in_vocab = vocab.get(IMAGE_MARKER) == config.image_token_id

    def process_image(self, image) -> ProcessedImage:
        cfg = self.config
        rgb = load_image(image, cfg.semantics)
        size = (rgb.height, rgb.width)
        if cfg.model_type == "llava":
            crops = preprocess_square([rgb], cfg.image_aspect_ratio, cfg.vision.image_size, cfg.semantics,
                                      cfg.image_resize)
            return ProcessedImage(crops, None, cfg.tokens_per_crop, size)
        crops, plan = preprocess_anyres(rgb, cfg.image_grid_pinpoints, cfg.semantics, cfg.vision.image_size,
                                        cfg.vision.patch_size, cfg.image_resize, cfg.patch_merge_type)
        return ProcessedImage(crops, plan, plan.num_tokens, size)

    def token_ids(self, text: str, images: list[ProcessedImage]) -> list[int]:
        """Ids of `text` with each `<image>` marker expanded to its image's feature count."""
        markers = text.count(IMAGE_MARKER)
        if markers != len(images):
            raise PromptError(f"the prompt has {markers} {IMAGE_MARKER} marker(s) but {len(images)} image(s) were given")
        counts = [im.num_tokens for im in images]
        if self.config.semantics == "hf" and self.image_token_in_vocab:
            parts = text.split(IMAGE_MARKER)
            expanded = parts[0] + "".join(IMAGE_MARKER * n + p for n, p in zip(counts, parts[1:], strict=True))
            return list(self.tokenizer(expanded)["input_ids"])
        placeholder = ORIGINAL_IMAGE_TOKEN_INDEX  # never a real id: expanded right away
        ids = tokenizer_image_token(text, self.tokenizer, placeholder)
        return expand_image_tokens(ids, counts, self.config.image_token_id, placeholder_id=placeholder)

    def __call__(self, images=None, text=None, padding: bool = False) -> dict[str, np.ndarray]:
        """HF-processor-compatible arrays: input_ids, attention_mask, pixel_values (and image_sizes for NeXT).

        images: a list of images used in order by the `<image>` markers of all texts. With several texts of
        different lengths, pass padding=True to left-pad them (with the tokenizer's pad id, else 0).
        """
        texts = [text] if isinstance(text, str) else list(text or [])
        if images is None:
            images = []
        elif not isinstance(images, list | tuple):
            images = [images]
        processed = [self.process_image(im) for im in images]
        total = sum(t.count(IMAGE_MARKER) for t in texts)
        if total != len(processed):
            raise PromptError(f"the text has {total} {IMAGE_MARKER} marker(s) but {len(processed)} image(s) were given")
        rows, k = [], 0
        for t in texts:
            n = t.count(IMAGE_MARKER)
            rows.append(self.token_ids(t, processed[k : k + n]))
            k += n
        out: dict[str, np.ndarray] = {}
        if rows:
            longest = max(map(len, rows))
            if not padding and any(len(r) != longest for r in rows):
                raise PromptError("texts tokenize to different lengths: pass padding=True to left-pad them")
            pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
            ids = np.full((len(rows), longest), pad_id, np.int64)
            mask = np.zeros((len(rows), longest), np.int64)
            for b, r in enumerate(rows):
                ids[b, longest - len(r):], mask[b, longest - len(r):] = r, 1
            out["input_ids"], out["attention_mask"] = ids, mask
        if processed:
            if self.config.model_type == "llava":
                out["pixel_values"] = np.concatenate([p.crops for p in processed])
            else:
                max_crops = max(len(p.crops) for p in processed)
                size = self.config.vision.image_size
                px = np.zeros((len(processed), max_crops, 3, size, size), np.float32)
                for i, p in enumerate(processed):
                    px[i, : len(p.crops)] = p.crops
                out["pixel_values"] = px
                out["image_sizes"] = np.array([p.size for p in processed], np.int64)
        return out
