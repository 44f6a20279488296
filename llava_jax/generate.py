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

import os
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .errors import InputError
from .layers import bits_view
from .llama import init_cache, unstack_layers
from .llava import Llava, merge_image_features
from .sharding import put, to_host

MAX_STOP_IDS = 8  # stop-token slots in the decode graph (padded with -1)


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


def pad_batch(batch: PreparedBatch, multiple: int) -> PreparedBatch:
    """Append dummy rows (a one-token prompt, no image) until the batch size is a multiple of `multiple`.

    A sharded batch must divide the mesh's data axis; callers drop the dummy rows' outputs (the first
    `len(batch.lengths)` rows of the result are the original rows, unchanged).
    """
    rows, seq = batch.input_ids.shape
    total = -(-rows // multiple) * multiple
    if total == rows:
        return batch
    extra = total - rows

    def grow(a, fill=0):  # per-row arrays get `extra` rows, flat (batch * seq) ones `extra * seq`
        return np.concatenate([a, np.full((extra * (a.shape[0] // rows), *a.shape[1:]), fill, a.dtype)])

    mask = grow(batch.attention_mask, False)
    mask[rows:, -1] = True
    # feature rows are flat batch * seq positions; the "drop" marker is one past the end, which moves
    positions = batch.feature_positions.copy()
    positions[positions == rows * seq] = total * seq
    return PreparedBatch(grow(batch.input_ids), mask, grow(batch.positions), grow(batch.features),
                         grow(positions, total * seq), grow(batch.lengths, 1))


class Decoder:
    """The jitted prefill and decode programs of one model (compiled per shape, cached by jax.jit).

    With a `plan` (a `sharding.ShardingPlan`) and the params' shardings, both programs are jitted with explicit
    in/out shardings: params as placed by `load`, batch inputs and the cache over the data axis, the cache's kv
    heads over the model axis; the decode state is donated either way. Batches are padded to a multiple of the
    data axis by `run_generation`. Without a plan everything stays on the default device.
    """

    def __init__(self, module: Llava, config, plan=None, param_shardings=None):
        self.module = module
        self.config = config
        self.plan = plan
        if plan is None:
            self.prefill = jax.jit(self._prefill, static_argnames=("cache_len",))
            self.decode = jax.jit(self._decode, donate_argnames=("state",))
            return
        rep, inp, state = plan.replicated, plan.input_sharding, plan.state_shardings()
        batch_in = tuple(inp(n) for n in ("input_ids", "features", "feature_positions", "positions",
                                          "attention_mask"))
        # jit refuses keyword arguments with in_shardings: cache_len (static) is passed positionally
        self.prefill = jax.jit(self._prefill, static_argnums=(10,), out_shardings=state,
                               in_shardings=(param_shardings, *batch_in, rep, rep, rep, rep))
        self.decode = jax.jit(self._decode, donate_argnames=("state",), out_shardings=state,
                              in_shardings=(param_shardings, state, rep, rep, rep, rep, rep))

    @property
    def data_size(self) -> int:
        """Batch sizes must be a multiple of this (the mesh's data axis; 1 without a plan)."""
        return 1 if self.plan is None else self.plan.data_size

    def put_input(self, name: str, x):
        """A host batch array onto the device(s): sharded over the data axis with a plan."""
        return jnp.asarray(x) if self.plan is None else put(x, self.plan.input_sharding(name))

    def put_replicated(self, x):
        """A small host value (pytree) every device needs whole."""
        if self.plan is None:
            return x
        return jax.tree_util.tree_map(lambda leaf: put(leaf, self.plan.replicated), x)

    def stop_rows(self, done, rows: np.ndarray):
        """`done` with `rows` (host bool array) set; keeps the state's sharding."""
        if self.plan is None:
            return done | jnp.asarray(rows)
        return put(to_host(done) | np.asarray(rows), self.plan.state_shardings()["done"])

    def decode_params(self, params):
        """The params `decode` takes: on one CPU device, the decoder layers as per-layer views of the stacked
        arrays (`llama.unstack_layers`: no copy), so that a step reads each weight once instead of copying each
        layer's slice first; otherwise `params` itself. LLAVA_JAX_UNSTACKED_DECODE=0 turns the views off."""
        if self.plan is not None or os.environ.get("LLAVA_JAX_UNSTACKED_DECODE", "1") == "0":
            return params
        return self._view("decode", params, lambda p: unstack_layers(p) or p)

    def scan_params(self, params):
        """The params of the programs that scan over stacked layers (prefill; the model's vision tower and full
        forward): on one CPU device, 16-bit stacked kernels as uint16 views of the same buffers
        (`layers.bits_view`, see `layers.scan_stacked`); otherwise `params` itself."""
        if self.plan is not None:
            return params
        return self._view("scan", params, bits_view)

    def _view(self, kind: str, params, make):
        """`make(params)`, remembered for the latest `params` of each kind (views are zero-copy but not free)."""
        views = self.__dict__.setdefault("_views", {})
        if kind not in views or views[kind][0] is not params:
            views[kind] = (params, make(params))
        return views[kind][1]

    def _apply(self, params, *args, method):
        return self.module.apply({"params": params}, *args, method=method)

    def _prefill(self, params, input_ids, features, feature_positions, positions, attention_mask, sampler, key,
                 stop_ids, max_new_tokens, cache_len):
        """Run the prompt, sample the first token; returns the decode state."""
        batch, seq = input_ids.shape
        embeds = self._apply(params, input_ids, method=Llava.embed)
        embeds = merge_image_features(embeds, features, feature_positions)
        kv_mask = jnp.zeros((batch, cache_len), bool).at[:, :seq].set(attention_mask)
        cache = init_cache(self.config.text, batch, cache_len, embeds.dtype)
        if self.plan is not None:  # created inside the program: pin its layout from the start
            cache = jax.lax.with_sharding_constraint(cache, self.plan.cache_shardings())
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
    rows = len(batch.lengths)
    batch = pad_batch(batch, decoder.data_size)  # dummy rows up to a multiple of the data axis, dropped below
    rep = decoder.put_replicated  # small values every device needs whole (as they are without a mesh)
    stops = rep(stop_id_array(stop_ids))
    key = rep(jax.random.PRNGKey(seed))
    max_new = rep(jnp.int32(max_new_tokens))
    sampler = rep(sampler)
    inputs = [decoder.put_input(name, getattr(batch, name)) for name in
              ("input_ids", "features", "feature_positions", "positions", "attention_mask")]
    state = decoder.prefill(decoder.scan_params(params), *inputs, sampler, key, stops, max_new, cache_len)
    if len(batch.lengths) > rows:
        state["done"] = decoder.stop_rows(state["done"], np.arange(len(batch.lengths)) >= rows)
    chunk = chunk or max_new_tokens
    reported = 0
    cut = np.full(rows, -1)  # where the host stopped a row (stop strings)
    while True:
        step = int(state["step"])
        if on_tokens is not None:
            # a copy: the device buffer is donated to the next decode call
            stop_rows = on_tokens(np.array(state["tokens"])[:rows], reported, step)
            reported = step
            if stop_rows is not None and np.any(stop_rows):
                cut = np.where(np.asarray(stop_rows) & (cut < 0), step, cut)
                full = np.zeros(len(batch.lengths), bool)
                full[:rows] = stop_rows
                state["done"] = decoder.stop_rows(state["done"], full)
        if step >= max_new_tokens or bool(np.all(np.asarray(state["done"]))):
            break
        end = rep(jnp.int32(min(step + chunk, max_new_tokens)))
        state = decoder.decode(decoder.decode_params(params), state, sampler, stops, max_new, end,
                               rep(jnp.int32(pad_id)))
    tokens = np.array(state["tokens"])[:rows, : int(state["step"])]
    stop_set = set(int(i) for i in stop_ids)
    out = []
    for row, row_cut in zip(tokens.tolist(), cut, strict=True):
        row = row[:row_cut] if row_cut >= 0 else row
        end = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
        out.append(row[:end])
    return out
