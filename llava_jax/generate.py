"""Prefill + KV-cache decode with static shapes.

Shapes come from a few buckets so that XLA compiles a handful of programs, not one per request:
- prompts are left-padded to a length bucket (`prompt_bucket`), image features arrive in a buffer laid out
  like the padded sequence (batch * bucket rows), so one prefill program serves every image mix;
- the KV cache is preallocated at a length bucket (`cache_bucket`) covering prompt + new tokens;
- decoding is one `jax.lax.while_loop` program, run in chunks (to stream text, or to apply stop strings on the
  host); `max_new_tokens`, the chunk end, the sampler's parameters and the seed are traced values.
Positions are cumsum(attention_mask) - 1, as HF's `generate` uses, so left padding changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .errors import InputError
from .llama import init_cache
from .llava import Llava, merge_image_features

MAX_STOP_IDS = 8  # stop-token slots in the decode graph (padded with -1)


def prompt_bucket(length: int, minimum: int = 64) -> int:
    """Padded prompt length: the next power of two >= length (at least `minimum`)."""
    return max(minimum, 1 << max(0, int(length) - 1).bit_length())


def cache_bucket(length: int, granule: int = 256) -> int:
    """KV cache length: the next multiple of `granule` >= length."""
    return -(-int(length) // granule) * granule


@dataclass
class PreparedBatch:
    """Host-side arrays for one prefill: left-padded ids and image features in sequence layout."""

    input_ids: np.ndarray  # (batch, bucket) int32
    attention_mask: np.ndarray  # (batch, bucket) bool
    positions: np.ndarray  # (batch, bucket) int32
    features: np.ndarray  # (batch * bucket, hidden): row r holds the feature for flat position r
    feature_positions: np.ndarray  # (batch * bucket,) int32: r where row r is an image token, else batch*bucket
    lengths: np.ndarray  # (batch,) real prompt lengths


def scatter_image_features(input_ids: np.ndarray, features: list[np.ndarray], image_token_id: int, hidden: int,
                           dtype) -> tuple[np.ndarray, np.ndarray]:
    """Lay image features out like the flattened sequence: row r of the result feeds flat position r.

    Returns (features (batch * seq, hidden), positions (batch * seq,)) where positions[r] = r at image tokens
    and batch * seq (dropped by the merge) elsewhere: a fixed shape for any number and size of images.
    """
    flat = np.flatnonzero(np.asarray(input_ids).reshape(-1) == image_token_id)
    stacked = np.concatenate(features, axis=0) if features else np.zeros((0, hidden), dtype)
    if len(stacked) != len(flat):
        raise InputError(
            f"image features and image tokens do not match: input_ids hold {len(flat)} image tokens "
            f"(id {image_token_id}), the images give {len(stacked)} features"
        )
    size = np.asarray(input_ids).size
    out = np.zeros((size, hidden), dtype)
    out[flat] = stacked
    positions = np.full((size,), size, np.int32)
    positions[flat] = flat
    return out, positions


def prepare_batch(rows: list[list[int]], row_features: list[list[np.ndarray]], image_token_id: int,
                  hidden: int, dtype, bucket: int) -> PreparedBatch:
    """Left-pad `rows` to `bucket` and place each row's image features (in order) at its image tokens."""
    batch = len(rows)
    ids = np.zeros((batch, bucket), np.int32)
    mask = np.zeros((batch, bucket), bool)
    for b, row in enumerate(rows):
        ids[b, bucket - len(row):] = row
        mask[b, bucket - len(row):] = True
    feats = [f for row in row_features for f in row]
    features, feature_positions = scatter_image_features(ids, feats, image_token_id, hidden, dtype)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return PreparedBatch(ids, mask, positions, features, feature_positions, np.array([len(r) for r in rows]))


class Decoder:
    """The jitted prefill and decode programs of one model (compiled per shape, cached by jax.jit)."""

    def __init__(self, module: Llava, config):
        self.module = module
        self.config = config
        self.prefill = jax.jit(self._prefill, static_argnames=("cache_len",))
        self.decode = jax.jit(self._decode, donate_argnames=("state",))

    def _apply(self, params, *args, method):
        return self.module.apply({"params": params}, *args, method=method)

    def _prefill(self, params, input_ids, features, feature_positions, positions, attention_mask, sampler, key,
                 stop_ids, max_new_tokens, *, cache_len):
        """Run the prompt, sample the first token; returns the decode state."""
        batch, seq = input_ids.shape
        embeds = self._apply(params, input_ids, method=Llava.embed)
        embeds = merge_image_features(embeds, features, feature_positions)
        kv_mask = jnp.zeros((batch, cache_len), bool).at[:, :seq].set(attention_mask)
        cache = init_cache(self.config.text, batch, cache_len, embeds.dtype)
        hidden, cache = self._apply(params, embeds, positions, kv_mask, cache, 0, method=Llava.decode)
        logits = self._apply(params, hidden[:, -1:], method=Llava.logits)[:, 0]  # lm_head on the last only
        token = sampler(logits, jax.random.fold_in(key, 0))
        tokens = jnp.zeros((batch, cache_len), jnp.int32).at[:, 0].set(token)
        done = jnp.isin(token, stop_ids) | (max_new_tokens <= 1)
        return dict(cache=cache, kv_mask=kv_mask, tokens=tokens, done=done, step=jnp.int32(1),
                    position=positions[:, -1] + 1, write_index=jnp.int32(seq), key=key)

    def _decode(self, params, state, sampler, stop_ids, max_new_tokens, chunk_end, pad_id):
        """Decode until chunk_end (exclusive) or max_new_tokens, or every row has stopped."""

        def cond(s):
            return (s["step"] < jnp.minimum(chunk_end, max_new_tokens)) & ~jnp.all(s["done"])

        def body(s):
            step, batch = s["step"], s["tokens"].shape[0]
            last = jax.lax.dynamic_slice_in_dim(s["tokens"], step - 1, 1, axis=1)
            kv_mask = jax.lax.dynamic_update_slice_in_dim(s["kv_mask"], jnp.ones((batch, 1), bool),
                                                          s["write_index"], axis=1)
            embeds = self._apply(params, last, method=Llava.embed)
            hidden, cache = self._apply(params, embeds, s["position"][:, None], kv_mask, s["cache"],
                                        s["write_index"], method=Llava.decode)
            logits = self._apply(params, hidden, method=Llava.logits)[:, 0]
            token = sampler(logits, jax.random.fold_in(s["key"], step))
            token = jnp.where(s["done"], pad_id, token)
            done = s["done"] | jnp.isin(token, stop_ids) | (step + 1 >= max_new_tokens)
            tokens = jax.lax.dynamic_update_slice_in_dim(s["tokens"], token[:, None], step, axis=1)
            return dict(cache=cache, kv_mask=kv_mask, tokens=tokens, done=done, step=step + 1,
                        position=s["position"] + 1, write_index=s["write_index"] + 1, key=s["key"])

        return jax.lax.while_loop(cond, body, state)


def stop_id_array(stop_ids) -> jnp.ndarray:
    ids = sorted(set(int(i) for i in stop_ids))
    if len(ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} stop token ids are supported, got {len(ids)}")
    return jnp.asarray(ids + [-1] * (MAX_STOP_IDS - len(ids)), jnp.int32)


def run_generation(decoder: Decoder, params, batch: PreparedBatch, sampler, *, max_new_tokens: int, seed: int,
                   stop_ids, pad_id: int, cache_len: int,
                   on_tokens: Callable[[np.ndarray, int, int], np.ndarray | None] | None = None,
                   chunk: int | None = None) -> list[list[int]]:
    """Generate up to `max_new_tokens` per row; returns the new token ids of each row (through its stop token).

    on_tokens(tokens, start, end) is called after each chunk with the token buffer (batch, cache_len) and the
    new range [start, end); it may return a bool array (batch,) of rows to stop (stop strings, on the host).
    """
    stops = stop_id_array(stop_ids)
    key = jax.random.PRNGKey(seed)
    max_new = jnp.int32(max_new_tokens)
    state = decoder.prefill(params, jnp.asarray(batch.input_ids), jnp.asarray(batch.features),
                            jnp.asarray(batch.feature_positions), jnp.asarray(batch.positions),
                            jnp.asarray(batch.attention_mask), sampler, key, stops, max_new, cache_len=cache_len)
    chunk = chunk or max_new_tokens
    reported = 0
    cut = np.full(len(batch.lengths), -1)  # where the host stopped a row (stop strings)
    while True:
        step = int(state["step"])
        if on_tokens is not None:
            # a copy: the device buffer is donated to the next decode call
            stop_rows = on_tokens(np.array(state["tokens"]), reported, step)
            reported = step
            if stop_rows is not None and np.any(stop_rows):
                cut = np.where(np.asarray(stop_rows) & (cut < 0), step, cut)
                state["done"] = state["done"] | jnp.asarray(stop_rows)
        if step >= max_new_tokens or bool(jnp.all(state["done"])):
            break
        end = jnp.int32(min(step + chunk, max_new_tokens))
        state = decoder.decode(params, state, sampler, stops, max_new, end, jnp.int32(pad_id))
    tokens = np.array(state["tokens"])[:, : int(state["step"])]
    stop_set = set(int(i) for i in stop_ids)
    out = []
    for row, row_cut in zip(tokens.tolist(), cut, strict=True):
        row = row[:row_cut] if row_cut >= 0 else row
        end = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
        out.append(row[:end])
    return out
