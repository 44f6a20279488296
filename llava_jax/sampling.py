"""The sampler: one frozen dataclass, `Sampling`, with one method, `__call__(logits, key) -> token ids`.

It is a JAX pytree whose fields are traced, so changing a temperature or p reuses the compiled decode graph.
logits: (batch, vocab) float32. top-k and top-p keep the tokens HF's `TopKLogitsWarper` / `TopPLogitsWarper`
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
    index = jnp.clip(k - 1, 0, logits.shape[-1] - 1)
    kth = jnp.take_along_axis(jnp.sort(logits, axis=-1)[:, ::-1], index[None, None], axis=-1)
    return (logits >= kth) | (k <= 0)


def top_p_mask(logits, p):
    """True for the nucleus: tokens in the smallest top set whose probability mass reaches p (>= 1 token)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < p
    keep_sorted = keep_sorted.at[:, 0].set(True)
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
        t = jnp.where(self.temperature > 0, self.temperature, 1.0)
        scaled = logits / t
        scaled = jax.lax.cond(self.k > 0, lambda x: jnp.where(top_k_mask(x, self.k), x, NEG_INF), lambda x: x,
                              scaled)
        scaled = jax.lax.cond(self.p < 1, lambda x: jnp.where(top_p_mask(x, self.p), x, NEG_INF), lambda x: x,
                              scaled)
        sampled = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jnp.where(self.temperature > 0, sampled, greedy)


def make_sampler(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> Sampling:
    """The sampler for generate()'s arguments: temperature 0 is greedy (top_k/top_p then ignored).

    `SamplingError` (an `InputError`) for a temperature that is not a finite number >= 0, a top_p outside
    (0, 1] or a top_k that is not an integer >= 1 (`validation`)."""
    temperature, top_k, top_p = check_temperature(temperature), check_top_k(top_k), check_top_p(top_p)
    # top_k past the int32 range keeps every token, as k = 0 does
    k = 0 if top_k is None or top_k > 2**31 - 1 else top_k
    return Sampling(jnp.float32(temperature), jnp.int32(k), jnp.float32(1.0 if top_p is None else top_p))
