"""Activation functions by their transformers names (`hidden_act`, `projector_hidden_act`), with the same math.

One table for every place a config names an activation: the CLIP MLP, the decoder's gated MLP and the
projector. Each entry computes what transformers' `ACT2FN[name]` computes (same formula, same constants), so
fp32 results agree to rounding; `tests/test_activations.py` checks each against torch. Names transformers has but
this table lacks (learned or clipped variants no LLaVA checkpoint uses) are refused by `activation` with a
`ConfigError` that lists the supported ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


def _gelu_tanh(x):  # transformers' gelu_new / gelu_pytorch_tanh / gelu_accurate: the tanh approximation
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS: dict[str, Callable] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf GELU (torch nn.GELU()); NOT jax's tanh default
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_10": lambda x: jnp.clip(jax.nn.gelu(x, approximate=False), -10.0, 10.0),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),  # torch nn.LeakyReLU() default slope
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "hardswish": jax.nn.hard_swish,
    "linear": lambda x: x,
}


def activation(name: str, what: str = "activation") -> Callable:
    """The function for a transformers activation name; `ConfigError` naming `what` and the supported names."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        from .config import ConfigError  # deferred: config.py validates its names through this module

        raise ConfigError(f"{what}={name!r} is not supported (supported: {', '.join(sorted(ACTIVATIONS))})") from None
