"""Continuous batching on the device: a fixed number of decode slots, each holding one request at its own pace.

`SlotState` is a decode batch whose rows are independent requests: each row (slot) has its own cache write
index, position, step count, token budget, stop ids, sampling settings and PRNG key, so that a request can be
put into a free slot while the others keep decoding, and a finished one leaves at once. Three programs, each
compiled once for the server's (slots, cache length):

    empty   a state with every slot free (done)
    insert  a request's prefilled `DecodeState` (batch 1, from `GenerationEngine.start`, the same cache length)
            written into one slot; the slot index is traced, so one program serves every slot
    step    `steps_per_call` decode steps of every slot (a scan): the KV cache written at each row's own index
            (`write_cache` with one index per row), each row sampled with its own settings and key; several
            steps a call spread the host's per-call work (dispatch, reading tokens back, detokenizing) over
            several tokens, at the price of a new request waiting up to that many steps for a slot

Free and finished slots are computed too (the shapes are static) but change nothing that matters: their
tokens are ignored and an insert overwrites the whole row. A row's tokens equal what the same request gives
alone: rows never mix, and a row's key is its request's seed with the step number folded in, as in
`GenerationEngine.generate`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .engine import MAX_STOP_IDS, DecodeState, GenerationEngine
from .llama import init_cache
from .sampling import Sampling
from .sharding import STATE_AXES


@flax.struct.dataclass
class SlotState:
    """The decode batch of the server, on the device (donated from program to program); one row per slot."""

    cache: dict  # {"k", "v"}: (layers, slots, cache_len, kv_heads, head_dim)
    kv_mask: jax.Array  # (slots, cache_len) bool: cache entries holding a real token
    last_token: jax.Array  # (slots,) int32: the token sampled last (the next step's input)
    position: jax.Array  # (slots,) int32: the next token's position
    write_index: jax.Array  # (slots,) int32: the next cache entry of each row
    step: jax.Array  # (slots,) int32: tokens generated so far
    max_new: jax.Array  # (slots,) int32: each request's token budget
    done: jax.Array  # (slots,) bool: stopped (stop token or budget) or free
    stop_ids: jax.Array  # (slots, MAX_STOP_IDS) int32, padded with -1
    sampler: Sampling  # fields (slots,)
    key: jax.Array  # (slots, 2) uint32: each request's PRNG key


class SlotEngine:
    """The continuous-batching programs (`empty`, `insert`, `step`) over a `GenerationEngine`'s network."""

    def __init__(self, engine: GenerationEngine, slots: int, cache_len: int, dtype, steps_per_call: int = 1):
        self.engine, self.slots, self.cache_len, self.dtype = engine, slots, cache_len, dtype
        self.steps_per_call = steps_per_call
        placed = {} if engine.rules is None else {"out_shardings": self._shardings(engine.rules)}
        self.empty = jax.jit(self._empty, **placed)
        self.insert = jax.jit(self._insert, donate_argnums=(0,), **placed)
        self.step = jax.jit(self._step, donate_argnums=(1,), **(
            {} if engine.rules is None else {"out_shardings": (placed["out_shardings"], engine.rules.replicated,
                                                                engine.rules.replicated)}))

    @staticmethod
    def _shardings(rules) -> SlotState:
        """On a mesh: the cache and its mask as the decode state's (slots over the data axis, kv heads over the
        model axis), the small per-slot arrays replicated."""
        cache, rep = rules.sharding(STATE_AXES["cache"], name="kv cache"), rules.replicated
        return SlotState(cache={"k": cache, "v": cache}, kv_mask=rules.sharding(STATE_AXES["kv_mask"], name="kv_mask"),
                         last_token=rep, position=rep, write_index=rep, step=rep, max_new=rep, done=rep, stop_ids=rep,
                         sampler=Sampling(rep, rep, rep), key=rep)

    def admit(self, state: SlotState, params, batch, slot: int, sampler: Sampling, stop_ids, max_new: int,
              seed: int) -> tuple[SlotState, DecodeState]:
        """Prefill one request (`batch`: its left-padded prompt and images, one real row) alone with the engine's
        prompt-bucket program, and insert it into `slot`; returns (state, the request's prefilled `DecodeState`,
        whose tokens[0, 0] is its first token). stop_ids: `stop_id_array`'s padded array."""
        engine, max_new = self.engine, np.int32(max_new)
        first = engine.start(params, batch, engine.put_replicated(sampler), seed=seed,
                             stop_ids=engine.put_replicated(stop_ids), max_new_tokens=engine.put_replicated(max_new),
                             cache_len=self.cache_len)
        return self.insert(state, first, np.int32(slot), sampler, stop_ids, max_new), first

    def _empty(self) -> SlotState:
        n = self.slots
        zeros = jnp.zeros((n,), jnp.int32)
        return SlotState(
            cache=init_cache(self.engine.config.text, n, self.cache_len, self.dtype),
            kv_mask=jnp.zeros((n, self.cache_len), bool), last_token=zeros, position=zeros, write_index=zeros,
            step=zeros, max_new=zeros, done=jnp.ones((n,), bool), stop_ids=jnp.full((n, MAX_STOP_IDS), -1, jnp.int32),
            sampler=Sampling(jnp.zeros((n,), jnp.float32), zeros, jnp.ones((n,), jnp.float32)),
            key=jnp.zeros((n, 2), jnp.uint32))

    def _insert(self, state: SlotState, first: DecodeState, slot, sampler: Sampling, stop_ids,
                max_new) -> SlotState:
        """Row 0 of `first` (a prefilled request: its cache, mask, first token) into slot `slot`."""

        def put(rows, value):  # value: this request's entry (or row) for `rows`
            return rows.at[slot].set(jnp.asarray(value).astype(rows.dtype))

        cache = {name: jax.lax.dynamic_update_slice_in_dim(state.cache[name], first.cache[name][:, :1]
                                                           .astype(state.cache[name].dtype), slot, axis=1)
                 for name in ("k", "v")}
        return SlotState(
            cache=cache, kv_mask=put(state.kv_mask, first.kv_mask[0]), last_token=put(state.last_token,
                                                                                       first.tokens[0, 0]),
            position=put(state.position, first.position[0]), write_index=put(state.write_index, first.write_index),
            step=put(state.step, first.step), max_new=put(state.max_new, max_new), done=put(state.done, first.done[0]),
            stop_ids=put(state.stop_ids, stop_ids),
            sampler=jax.tree_util.tree_map(put, state.sampler, sampler), key=put(state.key, first.key))

    def _step(self, params, state: SlotState, pad_id):
        """`steps_per_call` tokens for every slot; returns (state, the new tokens (slots, steps_per_call), done
        (slots,)). A row that stops within the call gets `pad_id` after its stop."""

        def one(s: SlotState, _):
            rows = jnp.arange(self.slots)
            kv_mask = s.kv_mask.at[rows, s.write_index].set(True)
            logits, cache = self.engine.next_logits(params, s.last_token, s.position, kv_mask, s.cache,
                                                    s.write_index)
            token = s.sampler(logits, jax.vmap(jax.random.fold_in)(s.key, s.step))
            token = jnp.where(s.done, pad_id, token)
            live = (~s.done).astype(jnp.int32)
            done = s.done | jnp.any(token[:, None] == s.stop_ids, axis=1) | (s.step + 1 >= s.max_new)
            s = s.replace(cache=cache, kv_mask=kv_mask, last_token=token, done=done, step=s.step + live,
                          position=s.position + live,
                          write_index=jnp.minimum(s.write_index + live, self.cache_len - 1))
            return s, token

        state, tokens = jax.lax.scan(one, state, None, length=self.steps_per_call)
        return state, tokens.T, state.done
