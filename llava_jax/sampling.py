"""Samplers: small frozen dataclasses with one method, `__call__(logits, key) -> token ids`.

They are JAX pytrees whose fields are traced, so changing a temperature or p reuses the compiled decode graph.
logits: (batch, vocab) float32. top-k and top-p keep the tokens HF's `TopKLogitsWarper` / `TopPLogitsWarper`
keep (ties at the k-th value kept; the nucleus is the smallest set whose probability reaches p).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

NEG_INF = -jnp.inf


def top_k_mask(logits, k):
    """True for tokens whose logit is >= the k-th largest (k traced; k <= 0 keeps everything)."""
    kth = jnp.take_along_axis(jnp.sort(logits, axis=-1)[:, ::-1], jnp.clip(k - 1, 0)[None, None], axis=-1)
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
class Greedy:
    """Argmax: deterministic, the evaluation setting of LLaVA."""

    def __call__(self, logits, key):
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@struct.dataclass
class Temperature:
    """Sample from softmax(logits / temperature)."""

    temperature: float = 1.0

    def __call__(self, logits, key):
        return jax.random.categorical(key, logits / self.temperature, axis=-1).astype(jnp.int32)


@struct.dataclass
class TopK:
    """Sample among the k most likely tokens, at a temperature."""

    k: int = 50
    temperature: float = 1.0

    def __call__(self, logits, key):
        logits = jnp.where(top_k_mask(logits, self.k), logits, NEG_INF)
        return Temperature(self.temperature)(logits, key)


@struct.dataclass
class TopP:
    """Nucleus sampling at a temperature (applied first, as HF does), optionally after a top-k cut."""

    p: float = 0.9
    temperature: float = 1.0
    k: int = 0

    def __call__(self, logits, key):
        logits = logits / self.temperature
        logits = jnp.where(top_k_mask(logits, self.k), logits, NEG_INF)
        logits = jnp.where(top_p_mask(logits, self.p), logits, NEG_INF)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


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
        return jnp.where(self.temperature > 0, sampled, Greedy()(logits, key))


def make_sampler(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> Sampling:
    """The sampler for generate()'s arguments: temperature 0 is greedy (top_k/top_p then ignored)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    return Sampling(jnp.float32(temperature), jnp.int32(top_k or 0), jnp.float32(1.0 if top_p is None else top_p))
