"""`Dense`: `flax.linen.Dense`'s parameters, with the matmul accumulated and returned in fp32.

XLA:CPU runs a bf16 x bf16 matmul at full speed (its bf16 GEMM) only when the dot asks for an fp32 result
(`preferred_element_type`); a dot with a bf16 result is lowered as fp32 converts of both operands and an fp32
matmul, about half the speed. For fp32 params this is exactly `nn.Dense`.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def dense_fp32(x, kernel):
    """x (..., in) @ kernel (in, out), accumulated in fp32; returns fp32.

    A one-row product with 16-bit weights on CPU (a batch-1 decode step) gets a zero second row: XLA:CPU
    lowers a one-row bf16 dot by converting the whole weight matrix to fp32 first, on every call (a few
    GB/s), while a two-row dot runs its bf16 GEMM.
    """
    x = x.astype(kernel.dtype)
    rows = math.prod(x.shape[:-1])
    if rows == 1 and kernel.dtype.itemsize == 2 and jax.default_backend() == "cpu":
        x2 = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), x.dtype)])
        y = jax.lax.dot_general(x2, kernel, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return y[:1].reshape(*x.shape[:-1], kernel.shape[1])
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


class Dense(nn.Module):
    """Same tree as `nn.Dense(features, use_bias, dtype=dtype, param_dtype=dtype)`: `kernel` (in, out), `bias`.
    The result is cast to `dtype`, or left in fp32 with `fp32_result`."""

    features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    fp32_result: bool = False

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.dtype)
        if kernel.dtype == jnp.uint16:  # a `bits_view` of a 16-bit float kernel
            kernel = jax.lax.bitcast_convert_type(kernel, self.dtype)
        y = dense_fp32(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), self.dtype).astype(jnp.float32)
        return y if self.fp32_result else y.astype(self.dtype)


class DenseParams(nn.Module):
    """Declares `nn.Dense`'s params (`kernel` (in, out), `bias`) without applying them: for `fused_dense`."""

    features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features), self.dtype)
        if kernel.dtype == jnp.uint16:  # a `bits_view` of a 16-bit float kernel
            kernel = jax.lax.bitcast_convert_type(kernel, self.dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.dtype) if self.use_bias else None
        return kernel, bias


def fused_dense(x, params, dtype, fuse: bool = True):
    """Several projections of the same input [(kernel, bias), ...] -> their outputs (in `dtype`).

    With `fuse`, one matmul against the kernels concatenated on their output axis (built inside the program;
    for a prompt, one wide matmul runs faster than a wide and two narrow ones, and in a loop over stacked
    layers the concatenation replaces the per-layer copies of the slices). Without, one matmul each (a decode
    step: concatenating would copy the weights on every step).
    """
    if not fuse:
        outs = [dense_fp32(x, k) + (0 if b is None else b.astype(jnp.float32)) for k, b in params]
        return [o.astype(dtype) for o in outs]
    kernels = [k for k, _ in params]
    if _is_16bit_float(kernels[0]):  # concatenated as uint16: XLA:CPU would widen a 16-bit float concat to fp32
        kernel = jax.lax.bitcast_convert_type(jnp.concatenate(to_bits(kernels), axis=1), kernels[0].dtype)
    else:
        kernel = jnp.concatenate(kernels, axis=1)
    y = dense_fp32(x, kernel)
    if any(b is not None for _, b in params):
        y = y + jnp.concatenate([jnp.zeros(k.shape[1], k.dtype) if b is None else b for k, b in params]).astype(
            jnp.float32)
    sizes = [k.shape[1] for k, _ in params]
    return [part.astype(dtype) for part in jnp.split(y, list(np.cumsum(sizes)[:-1]), axis=-1)]


def _is_16bit_float(a) -> bool:
    return jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize == 2


def to_bits(tree):
    """16-bit float leaves -> uint16 views (a bitcast: free); other leaves unchanged."""
    return jax.tree_util.tree_map(lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16) if _is_16bit_float(a) else a,
                                  tree)


def from_bits(tree, dtypes):
    """Undo `to_bits` given the original dtypes (a tree of the same structure)."""
    return jax.tree_util.tree_map(lambda a, d: jax.lax.bitcast_convert_type(a, d) if a.dtype != d else a, tree, dtypes)


def scan_stacked(layer: nn.Module, stacked_params, carry, xs, *broadcast):
    """`lax.scan` of an unbound `layer` over params stacked on axis 0 (the tree `nn.scan` makes), with per-layer
    inputs `xs` (stacked likewise) whose outputs have the same structure and dtypes: `layer.apply(params_i,
    carry, xs_i, *broadcast) -> (carry, ys_i)`.

    Why not `nn.scan`: slicing a layer out of a 16-bit float stack makes XLA:CPU convert the whole stack to
    fp32 first (hoisted out of the loop: a hidden fp32 copy of every weight, 4 GB for a 1 B model in bf16).
    Here the stacks are sliced as uint16 views and bitcast back inside the loop, which is free.
    """
    dtypes = jax.tree_util.tree_map(lambda a: a.dtype, (stacked_params, xs))

    def body(c, bits):
        params, x = from_bits(bits, dtypes)
        c, y = layer.apply({"params": params}, c, x, *broadcast)
        return c, to_bits(y)

    carry, ys = jax.lax.scan(body, carry, to_bits((stacked_params, xs)))
    return carry, from_bits(ys, dtypes[1])


def zero_copy_put(host: np.ndarray, device) -> jax.Array | None:
    """`host` (a view into a CPU device buffer) as a device array sharing its memory, or None where jax would
    copy it (a buffer not 64-byte aligned)."""
    array = jax.device_put(host, device)
    return array if array.unsafe_buffer_pointer() == host.ctypes.data else None


def bits_view(params: dict) -> dict:
    """`params` with every stacked (3-D or more) 16-bit float kernel replaced by a uint16 array sharing its
    buffer (zero-copy, on one CPU device), for `scan_stacked`; `params` itself when there is nothing to view
    or views are impossible. (A bitcast inside the program would be materialized: a copy of every stack.)"""
    def view(path, leaf):
        name = jax.tree_util.keystr(path)
        if not (isinstance(leaf, jax.Array) and leaf.ndim >= 3 and name.endswith("['kernel']")
                and _is_16bit_float(leaf) and len(leaf.devices()) == 1 and leaf.device.platform == "cpu"):
            return leaf
        bits = zero_copy_put(np.asarray(leaf).view(np.uint16), leaf.device)
        return leaf if bits is None else bits

    return jax.tree_util.tree_map_with_path(view, params)
