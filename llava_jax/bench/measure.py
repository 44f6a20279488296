"""Measurements: memory (RSS), the compile-event log, summarizing repeated runs, and the machine's decode
floor (bytes of text weights read per token / the memory read bandwidth of an XLA matrix-vector product).

Nothing here imports jax or llava_jax at module level: the PyTorch side uses these helpers too, and its peak
RSS must be its own.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import numpy as np

# CPU features that decide how fast 16-bit matmuls run: without avx512_bf16 / amx_bf16 both XLA:CPU and PyTorch
# compute bf16 products through slow conversion paths, so bf16 results from machines with and without them
# are not comparable.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


def machine_info() -> dict:
    """The machine a benchmark ran on: core count, load average, CPU model and the matmul-relevant CPU flags
    (Linux; empty where /proc/cpuinfo is unreadable), and the XLA flags in effect."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()], "cpu_model": model,
            "cpu_flags": [f for f in CPU_FLAGS if f in flags], "xla_flags": os.environ.get("XLA_FLAGS", "")}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---- memory ----
def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child
    would report at least its parent's peak at the time of the fork."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def rss_bytes() -> int:
    """This process's current RSS."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed_load(load) -> tuple[object, dict]:
    """Call `load()` (it must return only once everything is in place); the result, and its time and memory:
    load_s, the RSS before and after, and the peak RSS while loading (this process's peak so far: each side
    runs in a fresh process, so it is the load's peak, imports included), also as the rise above the RSS
    before loading; and the CPU time it took."""
    before = rss_bytes()
    cpu, t = _cpu_seconds(), time.perf_counter()
    result = load()
    load_s, load_cpu_s = time.perf_counter() - t, _cpu_seconds() - cpu
    peak = peak_rss_bytes()
    return result, {"load_s": load_s, "load_cpu_s": load_cpu_s, "rss_before_load_gb": before / 1e9,
                    "rss_after_load_gb": rss_bytes() / 1e9, "load_peak_rss_gb": peak / 1e9,
                    "load_peak_rss_rise_gb": (peak - before) / 1e9}


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: on a machine shared with other jobs, the work a
    load does, which its wall time shows only when the cores are free."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- runs ----
def summarize_runs(runs: list[dict]) -> dict:
    """Cold = the first run; warm = the best of the others (min time to first token, max decode rate)."""
    cold, warm = runs[0], runs[1:] or runs[:1]
    best = min(warm, key=lambda r: r["ttft_s"])
    out = {
        "ttft_s": best["ttft_s"],
        "ttft_cold_s": cold["ttft_s"],
        "ttft_runs_s": [r["ttft_s"] for r in runs],
        "decode_tok_s": max(r["decode_tok_s"] for r in warm),
        "decode_cold_tok_s": cold["decode_tok_s"],
        "decode_runs_tok_s": [r["decode_tok_s"] for r in runs],
    }
    for key in ("preprocess_s", "vision_s", "prefill_s"):
        if key in best:
            out[key] = best[key]
    return out


def summarize_loads(runs: list[dict]) -> dict:
    """Repeated loads (each in a fresh process) -> the median run's figures, every run's time, and the highest
    peak RSS of them all."""
    median = sorted(runs, key=lambda r: r["load_s"])[(len(runs) - 1) // 2]
    return {**median, "load_runs_s": [r["load_s"] for r in runs],
            "load_peak_rss_gb": max(r["load_peak_rss_gb"] for r in runs),
            "load_peak_rss_rise_gb": max(r["load_peak_rss_rise_gb"] for r in runs)}


def decode_rate(new_tokens: int, decode_s: float) -> float:
    """Tokens/s of the decode steps (the first token comes from prefill); nan with a single new token."""
    return (new_tokens - 1) / decode_s if new_tokens > 1 else float("nan")


def common_prefix(a: list, b: list) -> int:
    """How many leading items two token lists share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ---- compilations ----
class CompileLog:
    """Compilations seen through `jax.monitoring`: tracing, lowering and XLA compile durations by function,
    and persistent-cache hits and misses."""

    def __init__(self):
        from jax import monitoring

        self.events: list[tuple[str, str, float]] = []
        self.hits = self.misses = 0
        monitoring.register_event_duration_secs_listener(self._on_duration)
        monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event: str, secs: float, **kwargs) -> None:
        if event.startswith("/jax/core/compile/"):
            self.events.append((event.rsplit("/", 1)[-1], kwargs.get("fun_name", "?"), secs))

    def _on_event(self, event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.hits += 1
        elif event == "/jax/compilation_cache/cache_misses":
            self.misses += 1

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int) -> dict:
        events = self.events[mark:]
        compiles = [(name, secs) for kind, name, secs in events if kind == "backend_compile_duration"]
        programs: dict[str, int] = {}
        for name, _ in compiles:
            programs[name] = programs.get(name, 0) + 1
        return {"compile_s": sum(secs for _, _, secs in events), "xla_compile_s": sum(s for _, s in compiles),
                "xla_compilations": len(compiles), "programs": programs}


# ---- the decode floor ----
def measure_bandwidth(megabytes: int = 512, repeats: int = 15) -> dict:
    """Memory read bandwidth as an XLA fp32 matrix-vector product sees it (batch-1 decode's access pattern):
    x (1, m) @ W (m, 8192) over a matrix much larger than the caches; the best of `repeats` runs."""
    import jax
    import jax.numpy as jnp

    n = 8192
    m = megabytes * 2**20 // (4 * n)
    w = jax.jit(lambda: jnp.ones((m, n), jnp.float32))()
    x = jnp.ones((1, m), jnp.float32)
    f = jax.jit(lambda w, x: x @ w)
    f(w, x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(w, x).block_until_ready()
        times.append(time.perf_counter() - t)
    nbytes = m * n * 4
    del w
    return {"read_gbs": nbytes / min(times) / 1e9, "read_gbs_median": nbytes / float(np.median(times)) / 1e9,
            "probe_bytes": nbytes}


def text_weight_bytes(config, dtype: str) -> dict:
    """Bytes of decoder weights: all of them, and those one decode step reads (all but the embedding table,
    of which a step reads one row per sequence)."""
    import jax

    from ..model import abstract_params

    text = abstract_params(config, dtype)["language_model"]
    leaves = jax.tree_util.tree_leaves_with_path(text)
    total = sum(leaf.size * leaf.dtype.itemsize for _, leaf in leaves)
    embed = sum(leaf.size * leaf.dtype.itemsize for path, leaf in leaves if "embed_tokens" in jax.tree_util.keystr(path))
    return {"text_weight_bytes": int(total), "read_per_token_bytes": int(total - embed)}
