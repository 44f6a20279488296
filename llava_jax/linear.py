"""`Linear`: the weights of one linear map, applied by the model's kernels.

The module only declares `weight` (out, in) and `bias` (out,) — torch's `nn.Linear` layout, so that a checkpoint's
tensors are the params as they are (loading is a cast, not a transpose) — and returns them, so that a layer can
hand several maps of the same input to `Kernels.project` at once (a backend may fuse them).
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
        """Returns (weight (out, in), bias (out,) or None)."""
        init = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)  # fan_in is the last axis
        weight = self.param("weight", init, (self.features, in_features), self.dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.dtype) if self.use_bias else None
        return weight, bias


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


def adapter_of(module: nn.Module, name: str):
    """The low-rank adapter the param tree holds for `module`'s child `name` (its `lora` entry: see
    `add_low_rank`), or None: the tree of a plain model has none."""
    child = module.variables.get("params", {}).get(name, {})
    return child.get("lora") if hasattr(child, "get") else None


def add_low_rank(x, outputs, adapters):
    """`outputs[i] + dropout(x) @ a_i @ b_i` for each adapter {"a": (in, r), "b": (r, out)} that is not None
    (LoRA; `b` already carries the alpha / r scale); fp32 like `Kernels.project`'s outputs.

    An adapter may carry {"dropout": {"key": PRNG key, "rate": scalar}}: its input is then dropped out as
    torch's Dropout does (zeroed with probability rate, the rest scaled by 1 / (1 - rate)), with its own mask."""
    out = []
    for y, adapter in zip(outputs, adapters, strict=True):
        if adapter is None:
            out.append(y)
            continue
        a, b, h = adapter["a"], adapter["b"], x
        if "dropout" in adapter:
            rate = adapter["dropout"]["rate"]
            keep = jax.random.bernoulli(adapter["dropout"]["key"], 1.0 - rate, h.shape)
            h = jnp.where(keep, h / (1.0 - rate).astype(h.dtype), jnp.zeros((), h.dtype))
        low = jnp.matmul(h.astype(a.dtype), a, preferred_element_type=jnp.float32).astype(b.dtype)
        out.append(y + jnp.matmul(low, b, preferred_element_type=jnp.float32))
    return out
