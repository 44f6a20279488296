"""`Dense`: `flax.linen.Dense`'s parameters, with the matmul accumulated and returned in fp32.

XLA:CPU runs a bf16 x bf16 matmul at full speed (its bf16 GEMM) only when the dot asks for an fp32 result
(`preferred_element_type`); a dot with a bf16 result is lowered as fp32 converts of both operands and an fp32
matmul, about half the speed. For fp32 params this is exactly `nn.Dense`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def dense_fp32(x, kernel):
    """x (..., in) @ kernel (in, out), accumulated in fp32; returns fp32."""
    return jax.lax.dot_general(x.astype(kernel.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


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
        y = dense_fp32(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), self.dtype).astype(jnp.float32)
        return y if self.fp32_result else y.astype(self.dtype)
