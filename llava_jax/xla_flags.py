"""Process-wide JAX/XLA setup shared by the `llava-jax` command and its benchmark's child processes:
the XLA:CPU flags this workload runs faster with, and the persistent compilation cache.

Measured on this workload (2-core Zen 4, jax 0.10; see docs/benchmarks and the benchmark section of the
README): by default XLA:CPU hands the softmax reductions of attention to YNNPACK fused graphs, which run them
several times slower than XLA's own loops (vision attention 150 -> 94 ms a layer without them); and XLA's
GEMM/matvec emitters without XNNPACK are a few percent faster on these shapes. They change speed, not results.
"""

from __future__ import annotations

import os

CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-reduce", "--xla_cpu_use_xnnpack=false")


def set_default_xla_flags() -> None:
    """Add `CPU_XLA_FLAGS` to XLA_FLAGS (flags the user set win); must run before jax starts its backend.
    LLAVA_JAX_XLA_FLAGS=0 leaves XLA_FLAGS alone."""
    if os.environ.get("LLAVA_JAX_XLA_FLAGS", "1").lower() in ("0", "off", "none", "false"):
        return
    current = os.environ.get("XLA_FLAGS", "")
    given = {flag.split("=")[0] for flag in current.split()}
    extra = [flag for flag in CPU_XLA_FLAGS if flag.split("=")[0] not in given]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([*extra, current]).strip()


def enable_compilation_cache() -> None:
    """Persist compiled XLA programs, so that a second run of the CLI does not compile again
    (LLAVA_JAX_COMPILATION_CACHE: the folder, or `off`; default ~/.cache/llava-jax/xla)."""
    import jax

    from .default_model import cache_root

    path = os.environ.get("LLAVA_JAX_COMPILATION_CACHE", str(cache_root() / "xla"))
    if path.lower() in ("", "0", "off", "none"):
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
