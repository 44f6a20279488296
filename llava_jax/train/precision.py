"""Training precision: the dtype of the params the optimizer updates (and so of its moments, and of the
gradient accumulator) and the dtype the network computes in.

    "fp32"   fp32 params, optimizer state and compute
    "mixed"  fp32 master params and optimizer state; each step casts the params to bf16 inside the loss, so the
             matmuls, activations and saved residuals are bf16, and the gradients flow back through the cast
             to the fp32 masters. The loss, the attention softmax, norms' statistics and every matmul's
             accumulation stay fp32 (the network's own rules: `Kernels.project`, `Kernels.attention`,
             `RMSNorm`, `loss.cross_entropy`)
    "bf16"   the model loaded in bf16: params, gradients, optimizer moments and accumulator all bf16. The
             smallest, and the least exact: an update smaller than 2^-8 of a weight is rounded away

Frozen params stay as loaded (fp32 under "mixed": the step casts them with the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..errors import InputError

PRECISIONS = ("fp32", "mixed", "bf16")


class PrecisionError(InputError):
    """An unknown precision name."""


@dataclass(frozen=True)
class Precision:
    """A training precision by name (see the module docstring)."""

    name: str = "fp32"

    def __post_init__(self):
        if self.name not in PRECISIONS:
            raise PrecisionError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.name!r}")

    @property
    def param_dtype(self):
        """The dtype of the loaded model, so of the trainable params and the optimizer state."""
        return jnp.bfloat16 if self.name == "bf16" else jnp.float32

    @property
    def compute_dtype(self):
        """The dtype the network computes in (its `dtype`)."""
        return jnp.float32 if self.name == "fp32" else jnp.bfloat16

    @property
    def load_dtype(self) -> str:
        """The `llava_jax.load` dtype name for `param_dtype`."""
        return "bfloat16" if self.name == "bf16" else "float32"

    def compute_params(self, params):
        """`params` with every floating leaf in `compute_dtype` (inside the loss: differentiable, a no-op where
        the dtypes already agree)."""
        def cast(x):
            return x.astype(self.compute_dtype) if x is not None and jnp.issubdtype(x.dtype, jnp.floating) else x

        return jax.tree_util.tree_map(cast, params, is_leaf=lambda x: x is None)
