"""The human-readable report of a benchmark result (`llava-jax bench` without `--json`)."""

from __future__ import annotations

ROWS = [("time to first token, warm (s)", "ttft_s", "{:.2f}"), ("time to first token, cold (s)", "ttft_cold_s", "{:.2f}"),
        ("  preprocess (s)", "preprocess_s", "{:.2f}"), ("  vision (s)", "vision_s", "{:.2f}"),
        ("  prefill + first token (s)", "prefill_s", "{:.2f}"), ("decode (tok/s)", "decode_tok_s", "{:.2f}"),
        ("  % of the floor", "floor_pct", "{:.0f}"), ("compile (s)", "compile_s", "{:.1f}"),
        ("compiled programs", "compiled_programs", "{}"), ("peak RSS (GB)", "peak_rss_gb", "{:.2f}"),
        ("load (s)", "load_s", "{:.1f}")]
RATIO_KEYS = ("ttft_s", "decode_tok_s", "peak_rss_gb", "ttft_cold_s")  # rows with a jax / torch ratio


LOAD_ROWS = [("load (s), median", "load_s", "{:.2f}"), ("  CPU time of it (s)", "load_cpu_s", "{:.2f}"),
             ("peak RSS while loading (GB)", "load_peak_rss_gb", "{:.2f}"),
             ("  rise above the imports (GB)", "load_peak_rss_rise_gb", "{:.2f}"),
             ("RSS after loading (GB)", "rss_after_load_gb", "{:.2f}"), ("params (GB)", "param_bytes", "{:.2f}")]


def print_load_report(r: dict) -> None:
    """The report of `--load-only`."""
    sides = [s for s in ("jax", "torch") if s in r]
    print(f"model {r['model']} ({r['dtype']}), {r['loads']} loads per side, load average "
          f"{', '.join(f'{v:.1f}' for v in r['machine']['load_average'])}")
    print(f"{'':32s}" + "".join(f"{s:>12s}" for s in sides) + ("       ratio" if "ratios" in r else ""))
    for label, key, fmt in LOAD_ROWS:
        vals = [r[s][key] / (1e9 if key == "param_bytes" else 1) for s in sides]
        line = f"{label:32s}" + "".join(f"{fmt.format(v):>12s}" for v in vals)
        if len(vals) == 2 and key in ("load_s", "load_cpu_s", "load_peak_rss_gb"):
            line += f"{vals[0] / vals[1]:12.2f}"
        print(line)
    for s in sides:
        print(f"{s} loads (s): {', '.join(f'{v:.2f}' for v in r[s]['load_runs_s'])}")


def print_report(r: dict) -> None:
    if r.get("load_only"):
        print_load_report(r)
        return
    f = r["floor"]
    kernels = f", kernels {r['jax']['kernels']}" if "kernels" in r.get("jax", {}) else ""
    print(f"model {r['model']} ({r['dtype']}{kernels}), image {r['image_size'][0]}x{r['image_size'][1]} "
          f"({r['crops']} crops, {r['image_tokens']} image tokens), prompt {r['prompt_tokens']} tokens, "
          f"batch {r['batch']}, {r['new_tokens']} new tokens")
    print(f"decode floor: {f['read_per_token_bytes'] / 1e9:.2f} GB of text weights per token / "
          f"{f['bandwidth_gbs']:.1f} GB/s = {f['decode_floor_tok_s']:.2f} tok/s")
    sides = [s for s in ("jax", "torch") if s in r]
    print(f"{'':32s}" + "".join(f"{s:>12s}" for s in sides) + ("       ratio" if "ratios" in r else ""))
    for label, key, fmt in ROWS:
        vals = [r[s].get(key) for s in sides]
        line = f"{label:32s}" + "".join(f"{fmt.format(v) if v is not None else '-':>12s}" for v in vals)
        if "ratios" in r and None not in vals and key in RATIO_KEYS:
            line += f"{vals[0] / vals[1]:12.2f}"
        print(line)
    if "torch" in r:
        print(f"same input ids: {r['same_input_ids']}; greedy tokens agree on the first {r['same_tokens_prefix']} "
              f"of {r['new_tokens']}")
