"""Checks at the API boundary: generation settings and token batches, refused with a message naming the value.

Without them, bad values fail deep inside (`ZeroDivisionError`, a JAX shape error) or, worse, run with a
silently wrong meaning: a NaN temperature compares false with 0 and decodes greedily, an id past the
vocabulary is clamped by the embedding gather. Each check raises an `InputError` subclass.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from .errors import SamplingError, TokenError

_INT64 = (-(2**63), 2**63 - 1)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def check_temperature(value) -> float:
    """A finite number >= 0 (0 = greedy)."""
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {value!r}")
    return float(value)


def check_top_p(value) -> float | None:
    """None (off) or a number in (0, 1], positive also as the sampler's float32 (1e-233 would round to 0)."""
    if value is None:
        return None
    if not _is_real(value) or not math.isfinite(value) or not 0 < value <= 1 or not np.float32(value) > 0:
        raise SamplingError(f"top_p must be a number in (0, 1] (1 = off), got {value!r}")
    return float(value)


def check_top_k(value) -> int | None:
    """None (off) or an integer >= 1."""
    if value is None:
        return None
    if not _is_int(value) or value < 1 or value > _INT64[1]:
        raise SamplingError(f"top_k must be an integer >= 1, got {value!r}")
    return int(value)


def check_max_new_tokens(value) -> int:
    """An integer >= 1."""
    if not _is_int(value) or value < 1 or value > _INT64[1]:
        raise SamplingError(f"max_new_tokens must be an integer >= 1, got {value!r}")
    return int(value)


def check_seed(value) -> int:
    """An integer that fits in 64 bits."""
    if not _is_int(value) or not _INT64[0] <= value <= _INT64[1]:
        raise SamplingError(f"seed must be an integer between -2**63 and 2**63 - 1, got {value!r}")
    return int(value)


def check_stop(value) -> list[str]:
    """None, one stop string, or a sequence of them; each non-empty (an empty one would match at once)."""
    if value is None:
        return []
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, Sequence) or not all(isinstance(s, str) for s in strings):
        raise SamplingError(f"stop must be a string or a list of strings, got {value!r}")
    if any(s == "" for s in strings):
        raise SamplingError("stop strings must not be empty (an empty stop string would end every answer at once)")
    return list(strings)


def validate_sampling(*, temperature=0.0, top_p=None, top_k=None, max_new_tokens=128, stop=None, seed=0) -> None:
    """Check every generation setting (see each `check_*`); `SamplingError` names the first bad one."""
    check_temperature(temperature)
    check_top_p(top_p)
    check_top_k(top_k)
    check_max_new_tokens(max_new_tokens)
    check_stop(stop)
    check_seed(seed)


def check_token_batch(input_ids, attention_mask, config) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids as int32, attention_mask as bool) of a token batch that `forward` / `generate_ids` can run.

    input_ids: (batch, seq) integers, batch and seq >= 1, seq <= the context (`max_position_embeddings`),
    every id in [0, vocab_size) or the image token id (which is -200, outside the vocabulary, for original
    checkpoints). attention_mask: None (all ones) or the same shape, of 0/1 values, with at least one 1 per row.
    `TokenError` names the first bad value and where it is.
    """
    ids = np.asarray(input_ids)
    if ids.dtype == object or not (np.issubdtype(ids.dtype, np.integer)):
        raise TokenError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.ndim != 2:
        raise TokenError(f"input_ids must be (batch, seq), got shape {ids.shape}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise TokenError(f"input_ids must hold at least one row of at least one token, got shape {ids.shape}")
    text = config.text
    if ids.shape[1] > text.max_position_embeddings:
        raise TokenError(f"input_ids has {ids.shape[1]} positions; the model's context is "
                         f"{text.max_position_embeddings} tokens")
    bad = ~(((ids >= 0) & (ids < text.vocab_size)) | (ids == config.image_token_id))
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise TokenError(f"input_ids[{row}, {col}] = {int(ids[row, col])} is not a token id: ids must be in "
                         f"[0, {text.vocab_size}) or the image token {config.image_token_id} "
                         f"({int(bad.sum())} bad id(s) in all)")
    if attention_mask is None:
        mask = np.ones(ids.shape, bool)
    else:
        raw = np.asarray(attention_mask)
        if raw.shape != ids.shape:
            raise TokenError(f"attention_mask shape {raw.shape} != input_ids shape {ids.shape}")
        if raw.dtype == object or not (raw.dtype == bool or np.issubdtype(raw.dtype, np.number)) or not np.isin(
                raw, (0, 1)).all():
            raise TokenError("attention_mask must hold only 0 (padding) and 1 (real token)")
        mask = raw.astype(bool)
        empty = np.flatnonzero(~mask.any(axis=1))
        if len(empty):
            raise TokenError(f"row {int(empty[0])} of attention_mask has no real token (all 0)")
    return ids.astype(np.int32), mask
