"""Per-layer rematerialization: which activations a training step keeps from the forward pass for the backward
pass, and which it recomputes (`jax.checkpoint` around each scanned layer, see `Kernels.scan_layers`).

    "none"  keep every intermediate of every layer (no recomputation; the most memory)
    "dots"  keep the outputs of the weight matmuls (q/k/v/o, gate/up/down, CLIP's projections and MLP), recompute
            everything else: norms, RoPE, activations and attention. The policy is
            `dots_with_no_batch_dims_saveable`, not `dots_saveable`: attention's score and value products are
            dots with batch dimensions (batch, heads), and saving them would keep the (heads, seq, seq) score
            matrices of every layer, the one activation that grows with the square of the sequence
    "full"  keep only each layer's input (`nothing_saveable`): the backward pass reruns each layer's forward

Inference is untouched: a network built without `remat` (None, the default) runs its layers as before.
"""

from __future__ import annotations

import jax

from .errors import InputError

REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class RematError(InputError):
    """An unknown rematerialization policy name."""


def check_remat(name: str) -> str:
    """`name` if it is a policy of `REMAT_POLICIES`, else `RematError`."""
    if name not in REMAT_POLICIES:
        raise RematError(f"--remat must be one of {', '.join(REMAT_POLICIES)}, got {name!r}")
    return name


def rematerialized(layer, remat: str | None):
    """`layer` (a function of arrays) wrapped in `jax.checkpoint` with the policy `remat` names; unchanged for
    None (an inference network) and "none"."""
    if remat is None or check_remat(remat) == "none":
        return layer
    # prevent_cse=False: the layer runs inside a scan, which already keeps XLA from merging the recomputation
    # back into the forward pass (jax.checkpoint's documented advice for scanned bodies)
    return jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)
