"""The one seam between the model's math and a backend's speed.

The network (`clip.py`, `llama.py`, `network.py`) is plain math: every operation whose fast form differs by
backend goes through a `Kernels` object, chosen once per model by name:

    "reference"  plain jax.numpy math (`reference.py`): the definition every other set is tested against
    "xla_cpu"    XLA:CPU layouts and fusions (`xla_cpu.py`): the default on CPU
    "gpu"        cuDNN flash attention through `jax.nn.dot_product_attention` (`gpu.py`)
    "tpu"        the Pallas TPU flash attention kernels that ship with JAX (`tpu.py`)

The operations (see `Kernels` in reference.py): `project` (matmuls of one input, fp32 accumulation),
`attention`, `write_cache` (the KV-cache update), `scan_layers` (running stacked layers) and `prepare`
(per-program views of the params, made once outside the compiled programs).
"""

from __future__ import annotations

import functools

import jax

from ..errors import InputError
from .reference import Kernels

KERNEL_SETS = ("reference", "xla_cpu", "gpu", "tpu")
DEFAULT_FOR_BACKEND = {"cpu": "xla_cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


class KernelsError(InputError):
    """An unknown kernel set."""


def default_kernels() -> str:
    """The kernel set for the default JAX backend (the plain reference on backends without one)."""
    return DEFAULT_FOR_BACKEND.get(jax.default_backend(), "reference")


def resolve_kernels(name: str | None) -> str:
    """A kernel-set name, checked; None or "auto" -> `default_kernels()`."""
    if name in (None, "auto"):
        return default_kernels()
    if name not in KERNEL_SETS:
        raise KernelsError(f"unknown kernels {name!r} (choose from auto, {', '.join(KERNEL_SETS)})")
    return name


@functools.cache
def get_kernels(name: str, differentiable: bool = False) -> Kernels:
    """The `Kernels` object of a named set (imported on first use: only the chosen backend's code loads);
    differentiable: the variant a training network uses (see `Kernels`)."""
    name = resolve_kernels(name)
    if name == "reference":
        return Kernels(differentiable)
    if name == "xla_cpu":
        from .xla_cpu import XlaCpuKernels

        return XlaCpuKernels(differentiable)
    if name == "gpu":
        from .gpu import GpuKernels

        return GpuKernels(differentiable)
    from .tpu import TpuKernels

    return TpuKernels(differentiable)


__all__ = ["KERNEL_SETS", "Kernels", "KernelsError", "default_kernels", "get_kernels", "resolve_kernels"]
