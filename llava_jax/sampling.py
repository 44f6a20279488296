"""The sampler: one frozen dataclass, `Sampling`, with one method, `__call__(logits, key) -> token ids`.

It is a JAX pytree whose fields are traced, so changing a temperature or p reuses the compiled decode graph.
logits: (batch, vocab) float32. The fields are scalars (one setting for every row) or (batch,) arrays (one setting
per row: the continuous-batching server's slots, `slots.py`). top-k and top-p keep the tokens HF's `TopKLogitsWarper` / `TopPLogitsWarper`
keep (ties at the k-th value kept; the nucleus is the smallest set whose probability reaches p).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from .validation import check_temperature, check_top_k, check_top_p

NEG_INF = -jnp.inf


def top_k_mask(logits, k):
    """True for tokens whose logit is >= the k-th largest (k traced; k <= 0 or k >= vocab keeps everything)."""
    index = jnp.reshape(jnp.clip(k - 1, 0, logits.shape[-1] - 1), (-1, 1))  # (1, 1) or one per row
    kth = jnp.take_along_axis(jnp.sort(logits, axis=-1)[:, ::-1], index, axis=-1)
    return (logits >= kth) | (k <= 0)


def top_p_mask(logits, p):
    """True for the nucleus: tokens in the smallest top set whose probability mass reaches p (>= 1 token)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < p
    keep_sorted = keep_sorted.at[:, 0].set(True) | (p >= 1)  # p = 1 (a row's cut off) keeps every token
    return jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)


@struct.dataclass
class Sampling:
    """Everything generate() offers in one program: greedy at temperature 0, else temperature sampling after
    optional top-k (k = 0: off) and top-p (p = 1: off) cuts. All fields are traced, so switching between
    greedy and sampling, or changing any value, reuses the compiled decode graph; unused cuts are skipped
    at run time (`lax.cond`), not computed."""

    temperature: float = 0.0
    k: int = 0
    p: float = 1.0

    def __call__(self, logits, key):
        """Token ids (batch,) int32. key: one PRNG key (raw uint32 (2,)) for the batch, or one per row
        ((batch, 2)), so that a row samples the same tokens whatever else runs beside it."""
        # (1, 1) for scalar fields, (batch, 1) for per-row ones: broadcast over the vocabulary
        temperature, k, p = (jnp.reshape(x, (-1, 1)) for x in (self.temperature, self.k, self.p))
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
        scaled = jax.lax.cond(jnp.any(k > 0), lambda x: jnp.where(top_k_mask(x, k), x, NEG_INF), lambda x: x,
                              scaled)
        scaled = jax.lax.cond(jnp.any(p < 1), lambda x: jnp.where(top_p_mask(x, p), x, NEG_INF), lambda x: x,
                              scaled)
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

        def sample(x):
            if jnp.ndim(key) == 2:  # a key per row
                return jax.vmap(jax.random.categorical)(key, x).astype(jnp.int32)
            return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)

        # all-greedy batches skip drawing the random numbers (a Gumbel draw per vocabulary entry and row)
        sampled = jax.lax.cond(jnp.any(temperature > 0), sample, lambda x: greedy, scaled)
        return jnp.where(temperature[:, 0] > 0, sampled, greedy)


def make_sampler(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> Sampling:
    """The sampler for generate()'s arguments: temperature 0 is greedy (top_k/top_p then ignored).

    `SamplingError` (an `InputError`) for a temperature that is not a finite number >= 0, a top_p outside
    (0, 1] or a top_k that is not an integer >= 1 (`validation`)."""
    temperature, top_k, top_p = check_temperature(temperature), check_top_k(top_k), check_top_p(top_p)
    # top_k past the int32 range keeps every token, as k = 0 does
    k = 0 if top_k is None or top_k > 2**31 - 1 else top_k
    return Sampling(jnp.float32(temperature), jnp.int32(k), jnp.float32(1.0 if top_p is None else top_p))
