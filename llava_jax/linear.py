"""`Linear`: the weights of one linear map, applied by the model's kernels.

The module only declares `kernel` (in, out) and `bias` (out,) — `flax.linen.Dense`'s tree — and returns them,
so that a layer can hand several maps of the same input to `Kernels.project` at once (a backend may fuse them).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class Linear(nn.Module):
    features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, in_features: int):
        """Returns (kernel, bias or None)."""
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features), self.dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.dtype) if self.use_bias else None
        return kernel, bias


def stacked_layers(module: nn.Module, name: str, layer: nn.Module, count: int, *example_args):
    """Declare the params of `count` copies of `layer` stacked on a leading axis, as the param `name` of
    `module` (the tree `nn.scan` makes, without its machinery): at init each copy gets its own random key.
    Existing params are taken as given, unchecked: a backend may pass its own views of them (a list of
    per-layer dicts, see `Kernels.prepare`), which `Kernels.scan_layers` understands."""
    if module.has_variable("params", name):
        return module.get_variable("params", name)

    def init(rng):
        keys = jax.random.split(rng, count)
        return jax.vmap(lambda k: layer.init(k, *example_args)["params"])(keys)

    return module.param(name, init)
