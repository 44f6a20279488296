"""`GenerationEngine`: the compiled programs of one network, and the loop that drives them.

The straight pipeline, every stage on the device once the host has prepared the batch (`batch.py`):

    embed (one program per batch shape) -> insert_images (one per AnyRes pinpoint: vision tower, projector,
    packing, written into the embeddings in place) -> prefill (one per prompt bucket) -> decode (one program)

`logits` is the same without a cache (the HF-style `forward`). Shapes come from a few buckets so that XLA
compiles a handful of programs, not one per request: prompts are left-padded to a length bucket, the KV cache
is preallocated at a length bucket covering prompt + new tokens, and decoding is one `jax.lax.while_loop`,
run in chunks (to stream text or apply stop strings on the host), with `max_new_tokens`, the chunk end, the
sampler's parameters and the seed as traced values. Positions are cumsum(attention_mask) - 1, as HF's
`generate` uses, so left padding changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .batch import PromptBatch
from .kernels import get_kernels
from .llama import init_cache
from .network import LlavaNetwork
from .sharding import STATE_AXES, ShardingRules, put, to_host

MAX_STOP_IDS = 8  # stop-token slots in the decode program (padded with -1)


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries, on the device (donated from step to step)."""

    cache: dict  # {"k", "v"}: (layers, batch, cache_len, kv_heads, head_dim)
    kv_mask: jax.Array  # (batch, cache_len) bool: slots holding a real token
    tokens: jax.Array  # (batch, cache_len) int32: generated tokens, [0, step) filled
    done: jax.Array  # (batch,) bool: rows that have stopped
    step: jax.Array  # () int32: tokens generated so far
    position: jax.Array  # (batch,) int32: the next token's position
    write_index: jax.Array  # () int32: the next cache slot
    key: jax.Array  # PRNG key (each step folds in its step number)


class GenerationEngine:
    """The jitted programs of one network (compiled per shape, cached by jax.jit).

    With sharding `rules` (a `sharding.ShardingRules`) and the params' shardings, every program is jitted with
    explicit in/out shardings: params as placed by `load`, batch inputs, embeddings and the cache over the data
    axis, the cache's kv heads over the model axis, image crops replicated (an image is encoded alone; its crop
    count rarely divides the data axis). Without rules everything stays on the default device.
    """

    def __init__(self, network: LlavaNetwork, rules: ShardingRules | None = None, param_shardings=None):
        self.network = network
        self.config = network.config
        self.rules = rules
        self.kernels = get_kernels(network.kernels)
        self._views: dict = {}
        if rules is None:
            self.embed = jax.jit(self._embed)
            self.insert_images = jax.jit(self._insert_images, donate_argnums=(1,))
            self.logits = jax.jit(self._logits)
            self.prefill = jax.jit(self._prefill, static_argnums=(8,))
            self.decode = jax.jit(self._decode, donate_argnums=(1,))
            return
        rep, inp = rules.replicated, rules.input_sharding
        state = self.state_shardings()
        embeds = inp("embeds")
        self.embed = jax.jit(self._embed, in_shardings=(param_shardings, inp("input_ids")), out_shardings=embeds)
        self.insert_images = jax.jit(self._insert_images, donate_argnums=(1,), out_shardings=embeds,
                                     in_shardings=(param_shardings, embeds, rep, rep, rep))
        self.logits = jax.jit(self._logits, out_shardings=inp("logits"), in_shardings=(
            param_shardings, embeds, inp("positions"), inp("attention_mask")))
        self.prefill = jax.jit(self._prefill, static_argnums=(8,), out_shardings=state, in_shardings=(
            param_shardings, embeds, inp("positions"), inp("attention_mask"), rep, rep, rep, rep))
        self.decode = jax.jit(self._decode, donate_argnums=(1,), out_shardings=state,
                              in_shardings=(param_shardings, state, rep, rep, rep, rep, rep))

    # ---- placement ----
    @property
    def data_size(self) -> int:
        """Batch sizes must be a multiple of this (the mesh's data axis; 1 without rules)."""
        return 1 if self.rules is None else self.rules.data_size

    def state_shardings(self) -> DecodeState:
        s = self.rules.sharding
        cache = s(STATE_AXES["cache"], name="kv cache")
        return DecodeState(cache={"k": cache, "v": cache},
                           **{k: s(axes, name=k) for k, axes in STATE_AXES.items() if k != "cache"})

    def put_input(self, name: str, x):
        """A host batch array onto the device(s): sharded over the data axis with rules."""
        return jnp.asarray(x) if self.rules is None else put(x, self.rules.input_sharding(name))

    def put_replicated(self, x):
        """A small host value (pytree) every device needs whole."""
        if self.rules is None:
            return jax.tree_util.tree_map(jnp.asarray, x)
        return jax.tree_util.tree_map(lambda leaf: put(leaf, self.rules.replicated), x)

    def params_for(self, params, program: str):
        """`params` as the program takes them (`Kernels.prepare`: zero-copy views on some backends), made once
        per params object. Under sharding rules: `params` itself."""
        if self.rules is not None:
            return params
        if program not in self._views or self._views[program][0] is not params:
            self._views[program] = (params, self.kernels.prepare(params, program))
        return self._views[program][1]

    # ---- the device part of the pipeline ----
    def embeddings(self, params, batch: PromptBatch):
        """The batch's token embeddings with every image's features in place, on the device."""
        scan_params = self.params_for(params, "scan")
        embeds = self.embed(scan_params, self.put_input("input_ids", batch.input_ids))
        for image in batch.images:
            crops, index, positions = self.put_replicated((image.crops, image.feature_index, image.feature_positions))
            embeds = self.insert_images(scan_params, embeds, crops, index, positions)
        return embeds

    def forward_logits(self, params, batch: PromptBatch) -> np.ndarray:
        """fp32 logits (rows, seq, vocab) of the batch's real rows, on the host."""
        embeds = self.embeddings(params, batch)
        logits = self.logits(self.params_for(params, "scan"), embeds, self.put_input("positions", batch.positions),
                             self.put_input("attention_mask", batch.attention_mask))
        return to_host(logits)[: batch.rows]

    def generate(self, params, batch: PromptBatch, sampler, *, max_new_tokens: int, seed: int, stop_ids,
                 pad_id: int, cache_len: int,
                 on_tokens: Callable[[np.ndarray, int, int], np.ndarray | None] | None = None,
                 chunk: int | None = None) -> list[list[int]]:
        """Generate up to `max_new_tokens` per row; returns each real row's new token ids (through its stop token).

        on_tokens(tokens, start, end) is called after each chunk with the token buffer (rows, cache_len) and the
        new range [start, end); it may return a bool array (rows,) of rows to stop (stop strings, on the host).
        """
        rows, total = batch.rows, len(batch.input_ids)
        rep = self.put_replicated
        stops, max_new, sampler = rep((stop_id_array(stop_ids), np.int32(max_new_tokens), sampler))
        state = self.start(params, batch, sampler, seed=seed, stop_ids=stops, max_new_tokens=max_new,
                           cache_len=cache_len)
        chunk = chunk or max_new_tokens
        reported = 0
        cut = np.full(rows, -1)  # where the host stopped a row (stop strings)
        decode_params = self.params_for(params, "decode")
        while True:
            step = int(state.step)
            if on_tokens is not None:
                # a copy: the device buffer is donated to the next decode call
                stop_rows = on_tokens(np.array(to_host(state.tokens))[:rows], reported, step)
                reported = step
                if stop_rows is not None and np.any(stop_rows):
                    cut = np.where(np.asarray(stop_rows) & (cut < 0), step, cut)
                    state = self._stop_rows(state, np.pad(np.asarray(stop_rows, bool), (0, total - rows)))
            if step >= max_new_tokens or bool(np.all(to_host(state.done))):
                break
            end = rep(np.int32(min(step + chunk, max_new_tokens)))
            state = self.decode(decode_params, state, sampler, stops, max_new, end, rep(np.int32(pad_id)))
        tokens = to_host(state.tokens)[:rows, : int(state.step)]
        stop_set = set(int(i) for i in stop_ids)
        out = []
        for row, row_cut in zip(tokens.tolist(), cut, strict=True):
            row = row[:row_cut] if row_cut >= 0 else row
            end = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
            out.append(row[:end])
        return out

    def start(self, params, batch: PromptBatch, sampler, *, seed: int, stop_ids, max_new_tokens,
              cache_len: int) -> DecodeState:
        """Embed the batch, insert its images and prefill: the decode state holding each row's first token.
        sampler, stop_ids (`stop_id_array`) and max_new_tokens as placed by `put_replicated`; dummy rows
        (padding to the data axis) are stopped at once."""
        key = self.put_replicated(jax.random.PRNGKey(seed))
        embeds = self.embeddings(params, batch)
        state = self.prefill(self.params_for(params, "scan"), embeds, self.put_input("positions", batch.positions),
                             self.put_input("attention_mask", batch.attention_mask), sampler, key, stop_ids,
                             max_new_tokens, cache_len)
        if len(batch.input_ids) > batch.rows:
            state = self._stop_rows(state, np.arange(len(batch.input_ids)) >= batch.rows)
        return state

    def _stop_rows(self, state: DecodeState, rows: np.ndarray) -> DecodeState:
        done = to_host(state.done) | rows
        return state.replace(done=jnp.asarray(done) if self.rules is None else put(done, self.state_shardings().done))

    # ---- the programs ----
    def _apply(self, params, *args, method):
        return self.network.apply({"params": params}, *args, method=method)

    def _embed(self, params, input_ids):
        return self._apply(params, input_ids, method=LlavaNetwork.embed)

    def _insert_images(self, params, embeds, crops, feature_index, feature_positions):
        return self._apply(params, embeds, crops, feature_index, feature_positions, method=LlavaNetwork.insert_images)

    def _logits(self, params, embeds, positions, attention_mask):
        hidden, _ = self._apply(params, embeds, positions, attention_mask, None, method=LlavaNetwork.prefill)
        return self._apply(params, hidden, method=LlavaNetwork.logits)

    def _prefill(self, params, embeds, positions, attention_mask, sampler, key, stop_ids, max_new_tokens,
                 cache_len) -> DecodeState:
        """Run the prompt, sample the first token; returns the decode state."""
        batch, seq, _ = embeds.shape
        cache = init_cache(self.config.text, batch, cache_len, embeds.dtype)
        if self.rules is not None:  # created inside the program: pin its layout from the start
            cache = jax.lax.with_sharding_constraint(cache, self.state_shardings().cache)
        hidden, cache = self._apply(params, embeds, positions, attention_mask, cache, method=LlavaNetwork.prefill)
        logits = self._apply(params, hidden[:, -1:], method=LlavaNetwork.logits)[:, 0]  # lm_head on the last only
        token = sampler(logits, jax.random.fold_in(key, 0))
        return DecodeState(
            cache=cache, kv_mask=jnp.zeros((batch, cache_len), bool).at[:, :seq].set(attention_mask),
            tokens=jnp.zeros((batch, cache_len), jnp.int32).at[:, 0].set(token),
            done=jnp.isin(token, stop_ids) | (max_new_tokens <= 1), step=jnp.int32(1),
            position=positions[:, -1] + 1, write_index=jnp.int32(seq), key=key)

    def _decode(self, params, state: DecodeState, sampler, stop_ids, max_new_tokens, chunk_end, pad_id):
        """Decode until chunk_end (exclusive) or max_new_tokens, or every row has stopped."""

        def cond(s: DecodeState):
            return (s.step < jnp.minimum(chunk_end, max_new_tokens)) & ~jnp.all(s.done)

        def body(s: DecodeState):
            batch = s.tokens.shape[0]
            last = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)[:, 0]
            kv_mask = jax.lax.dynamic_update_slice_in_dim(s.kv_mask, jnp.ones((batch, 1), bool), s.write_index,
                                                          axis=1)
            logits, cache = self.next_logits(params, last, s.position, kv_mask, s.cache, s.write_index)
            token = sampler(logits, jax.random.fold_in(s.key, s.step))
            token = jnp.where(s.done, pad_id, token)
            done = s.done | jnp.isin(token, stop_ids) | (s.step + 1 >= max_new_tokens)
            tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, axis=1)
            return s.replace(cache=cache, kv_mask=kv_mask, tokens=tokens, done=done, step=s.step + 1,
                             position=s.position + 1, write_index=s.write_index + 1)

        return jax.lax.while_loop(cond, body, state)


    def next_logits(self, params, last_tokens, position, kv_mask, cache, write_index):
        """One decode step inside a program: the last tokens (batch,) at `position` (batch,), their keys and
        values written at cache slot `write_index` (a scalar, or (batch,): one per row), attending over
        `kv_mask` (batch, cache_len); returns (fp32 logits (batch, vocab), cache)."""
        embeds = self._apply(params, last_tokens[:, None], method=LlavaNetwork.embed)
        hidden, cache = self._apply(params, embeds, position[:, None], kv_mask, cache, write_index,
                                    method=LlavaNetwork.decode_step)
        return self._apply(params, hidden, method=LlavaNetwork.logits)[:, 0], cache


def stop_id_array(stop_ids) -> np.ndarray:
    """Stop token ids as the fixed-size array the decode program takes (padded with -1)."""
    ids = sorted(set(int(i) for i in stop_ids))
    if len(ids) > MAX_STOP_IDS:
        from .errors import InputError

        raise InputError(f"at most {MAX_STOP_IDS} stop token ids are supported, got {len(ids)}")
    return np.asarray(ids + [-1] * (MAX_STOP_IDS - len(ids)), np.int32)
