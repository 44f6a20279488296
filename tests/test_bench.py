"""`llava-jax bench` runs end to end and reports every field; a second CLI run compiles nothing.

Both tests run the real console script in subprocesses on the `tiny` benchmark shape (a toy LLaVA-NeXT written
by `llava-jax bench --make-checkpoint`). No timing is asserted: only that each figure is there and sane.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava_jax.bench.measure import CPU_FLAGS

CAT = str(Path(__file__).parent.parent / "llava_jax" / "assets" / "cat.jpg")


def cli(*args, env=None, timeout=300):
    exe = shutil.which("llava-jax", path=os.path.dirname(sys.executable)) or shutil.which("llava-jax")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "llava_jax", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny"
    cli("bench", "--make-checkpoint", str(path), "--shape", "tiny")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["text_config"]["hidden_size"] == 64
    assert {"model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {p.name for p in path.iterdir()}
    return path


def positive(x):
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


SIDE_FIELDS = ["ttft_s", "ttft_cold_s", "ttft_runs_s", "decode_tok_s", "decode_cold_tok_s", "decode_runs_tok_s",
               "preprocess_s", "load_s", "load_cpu_s", "load_peak_rss_gb", "peak_rss_gb", "rss_after_load_gb", "tokens",
               "floor_pct"]


def test_load_only_times_both_loads(checkpoint, capsys):
    """--load-only: each side's load in a fresh process, its time, CPU time and peak RSS, the ratios."""
    r = json.loads(cli("bench", "--model", str(checkpoint), "--load-only", "--compare-torch", "--repeats", "0",
                       "--json").stdout)
    assert r["load_only"] and r["loads"] == 1 and r["torch_model"] == str(checkpoint)
    for side in ("jax", "torch"):
        s = r[side]
        assert s["load_runs_s"] == [s["load_s"]]
        for key in ("load_s", "load_cpu_s", "load_peak_rss_gb", "rss_after_load_gb", "param_bytes"):
            assert positive(s[key]), (side, key)
        assert s["load_peak_rss_gb"] >= s["rss_after_load_gb"] and s["load_peak_rss_gb"] >= s["rss_before_load_gb"]
    assert r["ratios"]["load_ratio"] == r["jax"]["load_s"] / r["torch"]["load_s"]
    from llava_jax.bench import print_report

    print_report(r)
    text = capsys.readouterr().out
    assert "load (s), median" in text and "peak RSS while loading (GB)" in text


def test_repeated_loads_give_the_median_and_the_highest_peak():
    from llava_jax.bench.measure import summarize_loads

    runs = [{"load_s": t, "load_cpu_s": t / 2, "load_peak_rss_gb": peak, "load_peak_rss_rise_gb": peak - 0.5}
            for t, peak in ((3.0, 1.0), (1.0, 2.0), (2.0, 1.5))]
    s = summarize_loads(runs)
    assert s["load_s"] == 2.0 and s["load_cpu_s"] == 1.0  # the median run's figures
    assert s["load_runs_s"] == [3.0, 1.0, 2.0] and s["load_peak_rss_gb"] == 2.0 and s["load_peak_rss_rise_gb"] == 1.5


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    from convert import convert

    path = tmp_path_factory.mktemp("bench-converted") / "tiny"
    convert(str(checkpoint), str(path), dtype="float32")
    return path


def test_converted_model_needs_its_torch_model(converted):
    """transformers cannot read llava-jax's converted format: one line naming the option, before anything runs."""
    exe = shutil.which("llava-jax", path=os.path.dirname(sys.executable)) or shutil.which("llava-jax")
    for extra in ([], ["--load-only"]):  # --train-step takes the first path
        proc = subprocess.run([exe, "bench", "--model", str(converted), "--compare-torch", *extra], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert re.fullmatch(r"llava-jax: error: --compare-torch: \S+ is a converted llava-jax checkpoint, .* "
                            r"--torch-model\n", proc.stderr), proc.stderr


def test_bench_reports_every_field(checkpoint, converted, capsys):
    """The llava-jax side loads the converted checkpoint, transformers its safetensors source (--torch-model)."""
    new_tokens = 6
    out = cli("bench", "--model", str(converted), "--torch-model", str(checkpoint), "--image-size", "200x150",
              "--new-tokens", str(new_tokens), "--repeats", "1", "--compare-torch", "--json").stdout
    r = json.loads(out)
    assert r["model"] == str(converted) and r["torch_model"] == str(checkpoint)
    assert r["dtype"] == "float32" and r["image_size"] == [200, 150] and r["batch"] == 1
    assert r["kernels"] == "auto" and r["jax"]["kernels"] == "xla_cpu"  # requested; resolved on CPU
    assert r["new_tokens"] == new_tokens and r["crops"] >= 2 and 0 < r["image_tokens"] < r["prompt_tokens"]
    assert r["prompt_bucket"] >= r["prompt_tokens"] and r["cache_len"] >= r["prompt_bucket"] + new_tokens
    machine = r["machine"]  # bf16 speed depends on these flags: results are compared only with them in view
    assert machine["cpus"] == os.cpu_count() and len(machine["load_average"]) == 3
    assert set(machine["cpu_flags"]) <= set(CPU_FLAGS) and isinstance(machine["cpu_model"], str)
    floor = r["floor"]
    for key in ("bandwidth_gbs", "bandwidth_gbs_median", "text_weight_bytes", "read_per_token_bytes",
                "decode_floor_tok_s"):
        assert positive(floor[key]), key
    assert floor["read_per_token_bytes"] < floor["text_weight_bytes"]
    for side in ("jax", "torch"):
        for key in SIDE_FIELDS:
            assert key in r[side], (side, key)
        for key in ("ttft_s", "ttft_cold_s", "decode_tok_s", "preprocess_s", "load_s", "peak_rss_gb", "floor_pct"):
            assert positive(r[side][key]), (side, key)
        assert len(r[side]["ttft_runs_s"]) == len(r[side]["decode_runs_tok_s"]) == 2  # cold + 1 warm
        assert len(r[side]["tokens"]) == new_tokens
        assert r[side]["peak_rss_gb"] >= r[side]["rss_after_load_gb"] > 0
    jax_side = r["jax"]
    for key in ("vision_s", "prefill_s", "compile_s", "xla_compile_s"):
        assert positive(jax_side[key]), key
    # the cold run compiles the engine's programs (embed, insert_images for the image's one pinpoint, prefill,
    # decode) once each; warm runs nothing
    assert jax_side["model_programs"] == {"jit(_embed)": 1, "jit(_insert_images)": 1, "jit(_prefill)": 1,
                                          "jit(_decode)": 1}
    assert jax_side["compiled_programs"] == 4 and jax_side["xla_compilations"] >= 4
    assert jax_side["warm_compilations"] == 0 and jax_side["warm_tokens_equal"]
    assert jax_side["persistent_cache"]["enabled"] is False
    assert r["torch"]["new_tokens_generated"] == new_tokens and r["torch"]["threads"] >= 1
    # same checkpoint, same inputs, greedy in fp32: the same token ids
    assert r["same_input_ids"] is True and r["same_tokens_prefix"] == new_tokens
    for key in ("decode_speedup", "ttft_ratio", "ttft_cold_ratio", "peak_rss_ratio"):
        assert positive(r["ratios"][key]), key
    # the human-readable report of the same results
    from llava_jax.bench import print_report

    print_report(r)
    text = capsys.readouterr().out
    assert "decode floor" in text and "time to first token" in text and "peak RSS" in text and "ratio" in text


HIT = re.compile(r"Persistent compilation cache hit for '(\w+)'")
MISS = re.compile(r"PERSISTENT COMPILATION CACHE MISS for '(\w+)'")


def test_second_generate_run_uses_the_persistent_cache(checkpoint, tmp_path):
    cache = tmp_path / "xla-cache"
    env = {"LLAVA_JAX_COMPILATION_CACHE": str(cache), "JAX_LOG_COMPILES": "1", "JAX_EXPLAIN_CACHE_MISSES": "1"}
    args = ["generate", "--model", str(checkpoint), "--image", CAT, "--prompt", "What is this?",
            "--max-new-tokens", "4"]
    first = cli(*args, env=env)
    entries = sorted(p.name for p in cache.iterdir())
    missed = set(MISS.findall(first.stderr))
    model_programs = {"jit__embed", "jit__insert_images", "jit__prefill", "jit__decode"}  # the engine's programs
    assert model_programs <= missed and not HIT.findall(first.stderr)
    assert entries

    second = cli(*args, env=env)
    assert second.stdout == first.stdout  # same answer
    hits = set(HIT.findall(second.stderr))
    assert model_programs <= hits
    assert not MISS.findall(second.stderr), MISS.findall(second.stderr)
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing new written


def test_bench_runs_on_a_mesh(checkpoint):
    """--mesh reaches the benchmarked model: on 4 simulated devices, data=2,model=2 gives the one-device tokens."""
    args = ["bench", "--model", str(checkpoint), "--image-size", "200x150", "--new-tokens", "4", "--repeats", "0",
            "--json"]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    sharded = json.loads(cli(*args, "--mesh", "data=2,model=2", env=env).stdout)
    single = json.loads(cli(*args, "--mesh", "none", env=env).stdout)
    assert sharded["jax"]["mesh"] == {"data": 2, "model": 2} and single["jax"]["mesh"] is None
    assert sharded["jax"]["tokens"] == single["jax"]["tokens"] and len(single["jax"]["tokens"]) == 4


def test_torch_side_imports_neither_jax_nor_the_model():
    """The PyTorch child loads only the bench package's light modules: its peak RSS is its own."""
    child = Path(__file__).parent.parent / "llava_jax" / "bench" / "child.py"
    code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('child', {str(child)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m._import_path('torch'); "
            "import llava_jax.bench.torch_side; "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('jax', 'flax') or k.startswith('llava_jax.')"
            " and not k.startswith('llava_jax.bench')))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


def test_train_step_bench(checkpoint):
    """`bench --train-step --compare-torch`: both sides run a fine-tuning step on the same batch; every figure
    is there and sane, and the two first-step losses agree (same model, same batch, fp32: within 1e-4 relative)."""
    r = json.loads(cli("bench", "--model", str(checkpoint), "--train-step", "--compare-torch", "--image-size",
                       "200x150", "--batch", "1", "--repeats", "1").stdout)
    assert r["mode"] == "train_step" and r["dtype"] == "float32"
    for side in ("jax", "torch"):
        s = r[side]
        assert s["batch"] == 1 and s["seq_len"] > s["targets"] > 0, side
        for key in ("step_s", "cold_step_s", "tokens_per_s", "peak_rss_gb"):
            assert positive(s[key]), (side, key)
    assert r["jax"]["seq_len"] == r["torch"]["seq_len"] and r["jax"]["targets"] == r["torch"]["targets"]
    assert positive(r["ratios"]["tokens_per_s"]) and positive(r["ratios"]["peak_rss"])
    first = r["jax"]["first_loss"], r["torch"]["first_loss"]
    assert abs(first[0] - first[1]) < 1e-4 * first[1], first
