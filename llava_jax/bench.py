"""`llava-jax bench`: time llava-jax against transformers (PyTorch) on the same checkpoint and inputs.

One command run measures, for a LLaVA-NeXT prompt with one image:
- time to first token (host preprocessing + vision tower + prefill + first sample), cold (first call,
  compiling) and warm (best of the repeats);
- decode tokens/s (greedy, always exactly `--new-tokens` tokens: stop tokens are ignored);
- compile time and the compiled programs (from `jax.monitoring` events), persistent-cache hits;
- peak RSS (`ru_maxrss`): every side runs in its own subprocess, so each peak is that side's alone;
- the decode floor of this machine: bytes of text weights read per token / the memory read bandwidth of an
  XLA fp32 matrix-vector product, and the percentage of it that decode reaches;
- with `--compare-torch`, the same figures for transformers' `LlavaNextForConditionalGeneration` (same
  checkpoint, same image and prompt, greedy, forced to the same number of new tokens) and the ratios.

`llava-jax bench --make-checkpoint DIR --shape tinyllava` writes the benchmark's checkpoint without a hub: a
deterministic random-weight llava-hf LLaVA-NeXT with the full CLIP ViT-L/14-336 tower and a TinyLlama-1.1B
shaped decoder (`--shape 7b`: llava-v1.6-vicuna-7b's shape; `--shape tiny`: a toy for tests). Tensors are
generated and written one at a time (in row blocks) into safetensors shards: the model is never in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------------------------------------
# Benchmark checkpoints

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
SHAPES = {
    # TinyLlama-1.1B's decoder (vocab 32064 as llava-hf checkpoints have it: 32000 pieces, <image>, <pad>,
    # rounded up to a multiple of 64) under the full CLIP ViT-L/14-336 tower: about 1.4 B parameters.
    "tinyllava": dict(
        vision=CLIP_L_336,
        text=dict(vocab_size=32064, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096),
        pinpoints=PINPOINTS,
    ),
    # llava-hf/llava-v1.6-vicuna-7b-hf: about 7.1 B parameters.
    "7b": dict(
        vision=CLIP_L_336,
        text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        pinpoints=PINPOINTS,
    ),
    # a toy with the same structure, for tests: 56-pixel crops of 4x4 patches
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    image_size=56, patch_size=14, projection_dim=16),
        text=dict(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
        pinpoints=[[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]],
    ),
}
def checkpoint_config(shape: str, dtype: str = "float16") -> dict:
    """The llava-hf `config.json` of a benchmark shape."""
    s = SHAPES[shape]
    text = {
        "model_type": "llama", "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, **s["text"],
    }
    vision = {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
              "num_channels": 3, **s["vision"]}
    return {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "_name_or_path": f"llava-jax/bench-random-{shape}",
        "image_token_index": 32000,
        "image_grid_pinpoints": s["pinpoints"],
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "dtype": dtype,
        "text_config": text,
        "vision_config": vision,
    }


def _write_tokenizer(path: Path) -> None:
    """The Mistral SentencePiece tokenizer (offline, from mistral-common) with `<image>` = 32000 and
    `<pad>` = 32001, saved with transformers like llava-hf's tokenizers."""
    from transformers import AutoTokenizer

    from .prompt import mistral_tokenizer_dir

    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(str(mistral_tokenizer_dir(tmp)))
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        tok.add_special_tokens({"pad_token": "<pad>"})
        if tok.convert_tokens_to_ids("<image>") != 32000 or tok.convert_tokens_to_ids("<pad>") != 32001:
            raise RuntimeError("unexpected ids for <image>/<pad> in the Mistral tokenizer")
        tok.save_pretrained(str(path))


def _write_processor_files(path: Path, config: dict) -> None:
    """preprocessor_config.json / processor_config.json as llava-hf repos have them (for HF's AutoProcessor)."""
    v = config["vision_config"]
    size = v["image_size"]
    pre = {
        "image_processor_type": "LlavaNextImageProcessor", "processor_class": "LlavaNextProcessor",
        "crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "do_pad": True, "image_grid_pinpoints": config["image_grid_pinpoints"],
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "rescale_factor": 1 / 255,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    proc = {"processor_class": "LlavaNextProcessor", "patch_size": v["patch_size"], "image_token": "<image>",
            "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    (path / "processor_config.json").write_text(json.dumps(proc, indent=2))


def make_checkpoint(path, shape: str = "tinyllava", dtype: str = "float16", seed: int = 0,
                    shard_bytes: int | None = None, log=None) -> Path:
    """Write a deterministic random-weight llava-hf LLaVA-NeXT checkpoint of `shape` into `path`, with the
    Mistral tokenizer and the processor files HF's `AutoProcessor` needs. Memory stays at one block of one
    tensor whatever the model size (`random_checkpoint.write_random_checkpoint`)."""
    from .random_checkpoint import SHARD_BYTES, write_random_checkpoint

    path = Path(path)
    config = checkpoint_config(shape, dtype)
    params = write_random_checkpoint(path, config, dtype, seed, shard_bytes or SHARD_BYTES, log)
    _write_tokenizer(path)
    _write_processor_files(path, config)
    if log:
        log(f"{path}: {shape} LLaVA-NeXT, {params / 1e9:.3f} B parameters of {dtype}")
    return path


# ------------------------------------------------------------------------------------------------------------
# Shared helpers (both sides; the torch side imports nothing from llava_jax, so that its peak RSS is its own)

RESULT_MARK = "LLAVA_JAX_BENCH_RESULT "
PROMPT = "Describe this image in detail."
CAT = Path(__file__).resolve().parent / "assets" / "cat.jpg"


def bench_image(size: tuple[int, int], path: str | None = None):
    """The benchmark image: `path`, or the bundled cat photo resized to size = (width, height)."""
    from PIL import Image

    img = Image.open(path or CAT).convert("RGB")
    return img if path else img.resize(size, Image.BICUBIC)


def _peak_rss_bytes() -> int:
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _summarize_runs(runs: list[dict]) -> dict:
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


# ------------------------------------------------------------------------------------------------------------
# The JAX side (a child process)


class _CompileLog:
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


MODEL_PROGRAMS = ("jit(run)", "jit(_prefill)", "jit(_decode)")  # LlavaModel._encode_pack, Decoder.prefill, Decoder.decode


def _jax_once(model, text: str, images: list, new_tokens: int) -> dict:
    from llava_jax.generate import cache_bucket, prepare_batch, prompt_bucket, run_generation
    from llava_jax.sampling import make_sampler

    cfg = model.config
    t0 = time.perf_counter()
    processed = [model.processor.process_image(im) for im in images]
    rows = [model.processor.token_ids(text, [p]) for p in processed]
    t1 = time.perf_counter()
    feats = [[model.encode_image(p.crops, p.plan)] for p in processed]  # host arrays: synchronous
    t2 = time.perf_counter()
    bucket = prompt_bucket(max(map(len, rows)))
    batch = prepare_batch(rows, feats, cfg.image_token_id, cfg.text.hidden_size, model.dtype, bucket)
    marks: list[float] = []

    def on_tokens(_buffer, _start, _end):  # called (synchronously) after prefill, then after decoding
        marks.append(time.perf_counter())

    tokens = run_generation(model.decoder, model.params, batch, make_sampler(0.0), max_new_tokens=new_tokens,
                            seed=0, stop_ids=(), pad_id=0, cache_len=cache_bucket(bucket + new_tokens),
                            on_tokens=on_tokens)
    decode_s = marks[-1] - marks[0]
    return {
        "ttft_s": marks[0] - t0, "preprocess_s": t1 - t0, "vision_s": t2 - t1, "prefill_s": marks[0] - t2,
        "decode_s": decode_s, "decode_tok_s": (new_tokens - 1) / decode_s if new_tokens > 1 else float("nan"),
        "tokens": [list(map(int, r)) for r in tokens], "prompt_tokens": len(rows[0]),
        "image_tokens": int(sum(np.sum(np.asarray(r) == cfg.image_token_id) for r in rows[:1])),
        "crops": int(processed[0].crops.shape[0]), "prompt_bucket": bucket, "cache_len": cache_bucket(bucket + new_tokens),
        "input_ids_crc": zlib.crc32(np.asarray(rows[0], np.int64).tobytes()),
    }


def jax_side(opts: dict) -> dict:
    import jax

    if opts.get("compile_cache"):
        from llava_jax.cli import _enable_compilation_cache

        _enable_compilation_cache()
    log = _CompileLog()
    import llava_jax

    t = time.perf_counter()
    model = llava_jax.load(opts["model"], dtype=opts["dtype"], mesh=opts["mesh"], fsdp=opts["fsdp"])
    jax.block_until_ready(model.params)
    load_s = time.perf_counter() - t
    rss_loaded = _rss_bytes()
    images = [bench_image(tuple(opts["image_size"]), opts.get("image"))] * opts["batch"]
    runs = []
    for i in range(1 + opts["repeats"]):
        mark = log.mark()
        run = _jax_once(model, opts["text"], images, opts["new_tokens"])
        run.update(log.since(mark))
        runs.append(run)
        _log(f"jax run {i}: ttft {run['ttft_s']:.2f} s (vision {run['vision_s']:.2f}, prefill {run['prefill_s']:.2f}), "
             f"decode {run['decode_tok_s']:.2f} tok/s, {run['xla_compilations']} compilations")
    cold = runs[0]
    out = _summarize_runs(runs)
    programs = {name: count for name, count in cold["programs"].items() if name in MODEL_PROGRAMS}
    out.update({
        "load_s": load_s,
        "compile_s": cold["compile_s"],
        "xla_compile_s": cold["xla_compile_s"],
        "model_programs": programs,
        "all_programs": cold["programs"],
        "compiled_programs": sum(programs.values()),
        "xla_compilations": cold["xla_compilations"],
        "warm_compilations": sum(r["xla_compilations"] for r in runs[1:]),
        "persistent_cache": {"enabled": bool(jax.config.jax_compilation_cache_dir), "hits": log.hits,
                             "misses": log.misses},
        "rss_after_load_gb": rss_loaded / 1e9,
        "peak_rss_gb": _peak_rss_bytes() / 1e9,
        "tokens": cold["tokens"][0],
        "warm_tokens_equal": all(r["tokens"] == cold["tokens"] for r in runs[1:]),
    })
    for key in ("prompt_tokens", "image_tokens", "crops", "prompt_bucket", "cache_len", "input_ids_crc"):
        out[key] = cold[key]
    out["backend"] = jax.default_backend()
    out["mesh"] = dict(model.plan.mesh.shape) if model.plan is not None else None
    out["versions"] = {"jax": jax.__version__, "jaxlib": __import__("jaxlib").__version__}
    return out


# ------------------------------------------------------------------------------------------------------------
# The PyTorch side (a child process that never imports jax)


def torch_side(opts: dict) -> dict:
    import torch
    import transformers
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[opts["dtype"]]
    t = time.perf_counter()
    model = LlavaNextForConditionalGeneration.from_pretrained(opts["model"], dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(opts["model"])
    load_s = time.perf_counter() - t
    rss_loaded = _rss_bytes()
    gen = model.generation_config
    gen.eos_token_id = None  # forced length: never stop early (llava-jax: no stop ids)
    gen.pad_token_id = processor.tokenizer.pad_token_id or 0
    images = [bench_image(tuple(opts["image_size"]), opts.get("image"))] * opts["batch"]
    new_tokens = opts["new_tokens"]

    class Clock(BaseStreamer):
        """Timestamps of each `put`: the prompt first, then every generated token."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    runs = []
    for i in range(1 + opts["repeats"]):
        clock = Clock()
        t0 = time.perf_counter()
        inputs = processor(images=images, text=[opts["text"]] * len(images), return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 streamer=clock if len(images) == 1 else None, generation_config=gen)
        t_end = time.perf_counter()
        new = out[:, inputs["input_ids"].shape[1]:]
        if len(clock.times) >= 2:  # times[0]: the prompt; times[1]: the first new token
            first, decode_s = clock.times[1], clock.times[-1] - clock.times[1]
        else:  # batches: streamers take one row only; time the first token with a 1-token generate
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=1, do_sample=False, generation_config=gen)
            first = t1 + (time.perf_counter() - t_end)
            decode_s = (t_end - t1) - (first - t1)
        run = {"ttft_s": first - t0, "preprocess_s": t1 - t0, "decode_s": decode_s,
               "decode_tok_s": (new_tokens - 1) / decode_s if new_tokens > 1 else float("nan"),
               "tokens": new[0].tolist(), "new_tokens": int(new.shape[1]),
               "prompt_tokens": int(inputs["input_ids"].shape[1]),
               "input_ids_crc": zlib.crc32(inputs["input_ids"][0].numpy().astype(np.int64).tobytes())}
        runs.append(run)
        _log(f"torch run {i}: ttft {run['ttft_s']:.2f} s, decode {run['decode_tok_s']:.2f} tok/s")
    out = _summarize_runs(runs)
    out.update({
        "load_s": load_s,
        "rss_after_load_gb": rss_loaded / 1e9,
        "peak_rss_gb": _peak_rss_bytes() / 1e9,
        "tokens": runs[0]["tokens"],
        "new_tokens_generated": runs[0]["new_tokens"],
        "prompt_tokens": runs[0]["prompt_tokens"],
        "input_ids_crc": runs[0]["input_ids_crc"],
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    })
    return out


# ------------------------------------------------------------------------------------------------------------
# The machine's decode floor


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

    from .model import abstract_params

    text = abstract_params(config, dtype)["language_model"]
    leaves = jax.tree_util.tree_leaves_with_path(text)
    total = sum(leaf.size * leaf.dtype.itemsize for _, leaf in leaves)
    embed = sum(leaf.size * leaf.dtype.itemsize for path, leaf in leaves if "embed_tokens" in jax.tree_util.keystr(path))
    return {"text_weight_bytes": int(total), "read_per_token_bytes": int(total - embed)}


# ------------------------------------------------------------------------------------------------------------
# The command


def _run_child(side: str, opts: dict, env_extra: dict | None = None) -> dict:
    """Run one side in a fresh interpreter (its own peak RSS); the child prints one result line."""
    env = {**os.environ, **(env_extra or {})}
    # -P: the script's folder (llava_jax/) must not shadow top-level modules
    cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--child", side, json.dumps(opts)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the {side} benchmark process failed (exit code {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_MARK):])


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def run_bench(args) -> dict:
    from .config import load_config
    from .prompt import default_template, render_prompt, with_image_markers

    model_dir = args.model
    if model_dir is None:
        from .default_model import default_model_dir

        model_dir = str(default_model_dir())
    config = load_config(model_dir)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    text = render_prompt(default_template(config), [with_image_markers(args.prompt, 1)])
    opts = {"model": model_dir, "dtype": args.dtype, "image_size": [width, height], "image": args.image,
            "new_tokens": args.new_tokens, "batch": args.batch, "repeats": args.repeats, "text": text,
            "compile_cache": args.compile_cache, "mesh": args.mesh, "fsdp": args.fsdp}
    weights = text_weight_bytes(config, args.dtype)
    _log("measuring memory read bandwidth")
    bw = measure_bandwidth()
    floor_tok_s = bw["read_gbs"] * 1e9 / weights["read_per_token_bytes"]
    result = {
        "model": model_dir, "dtype": args.dtype, "image_size": [width, height], "batch": args.batch,
        "new_tokens": args.new_tokens, "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "floor": {**weights, "bandwidth_gbs": bw["read_gbs"], "bandwidth_gbs_median": bw["read_gbs_median"],
                  "decode_floor_tok_s": floor_tok_s},
    }
    _log("llava-jax side")
    jax_res = _run_child("jax", opts)
    jax_res["floor_pct"] = 100 * jax_res["decode_tok_s"] / floor_tok_s
    result["jax"] = jax_res
    for key in ("prompt_tokens", "image_tokens", "crops", "prompt_bucket", "cache_len"):
        result[key] = jax_res.pop(key)
    if args.compare_torch:
        _log("transformers (PyTorch) side")
        torch_res = _run_child("torch", opts)
        torch_res["floor_pct"] = 100 * torch_res["decode_tok_s"] / floor_tok_s
        result["torch"] = torch_res
        result["same_input_ids"] = torch_res.pop("input_ids_crc") == jax_res["input_ids_crc"]
        result["same_tokens_prefix"] = _common_prefix(jax_res["tokens"], torch_res["tokens"])
        result["ratios"] = {
            "decode_speedup": jax_res["decode_tok_s"] / torch_res["decode_tok_s"],
            "ttft_ratio": jax_res["ttft_s"] / torch_res["ttft_s"],
            "ttft_cold_ratio": jax_res["ttft_cold_s"] / torch_res["ttft_cold_s"],
            "peak_rss_ratio": jax_res["peak_rss_gb"] / torch_res["peak_rss_gb"],
        }
    jax_res.pop("input_ids_crc")
    return result


def _print_report(r: dict) -> None:
    f = r["floor"]
    print(f"model {r['model']} ({r['dtype']}), image {r['image_size'][0]}x{r['image_size'][1]} "
          f"({r['crops']} crops, {r['image_tokens']} image tokens), prompt {r['prompt_tokens']} tokens, "
          f"batch {r['batch']}, {r['new_tokens']} new tokens")
    print(f"decode floor: {f['read_per_token_bytes'] / 1e9:.2f} GB of text weights per token / "
          f"{f['bandwidth_gbs']:.1f} GB/s = {f['decode_floor_tok_s']:.2f} tok/s")
    sides = [s for s in ("jax", "torch") if s in r]
    rows = [("time to first token, warm (s)", "ttft_s", "{:.2f}"), ("time to first token, cold (s)", "ttft_cold_s", "{:.2f}"),
            ("  preprocess (s)", "preprocess_s", "{:.2f}"), ("  vision (s)", "vision_s", "{:.2f}"),
            ("  prefill + first token (s)", "prefill_s", "{:.2f}"), ("decode (tok/s)", "decode_tok_s", "{:.2f}"),
            ("  % of the floor", "floor_pct", "{:.0f}"), ("compile (s)", "compile_s", "{:.1f}"),
            ("compiled programs", "compiled_programs", "{}"), ("peak RSS (GB)", "peak_rss_gb", "{:.2f}"),
            ("load (s)", "load_s", "{:.1f}")]
    print(f"{'':32s}" + "".join(f"{s:>12s}" for s in sides) + ("       ratio" if "ratios" in r else ""))
    for label, key, fmt in rows:
        vals = [r[s].get(key) for s in sides]
        line = f"{label:32s}" + "".join(f"{fmt.format(v) if v is not None else '-':>12s}" for v in vals)
        if "ratios" in r and None not in vals and key in ("ttft_s", "decode_tok_s", "peak_rss_gb", "ttft_cold_s"):
            line += f"{vals[0] / vals[1]:12.2f}"
        print(line)
    if "torch" in r:
        print(f"same input ids: {r['same_input_ids']}; greedy tokens agree on the first {r['same_tokens_prefix']} "
              f"of {r['new_tokens']}")


def cmd_bench(args) -> int:
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint, args.shape, args.checkpoint_dtype, seed=args.seed, log=_log)
        return 0
    result = run_bench(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_report(result)
    return 0


def add_bench_parser(subparsers, add_model_args) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="time llava-jax (and, with --compare-torch, transformers) on one "
                              "image prompt; or write a benchmark checkpoint (--make-checkpoint)")
    add_model_args(p)
    p.add_argument("--image-size", default="1000x667", help="WxH of the benchmark image (default 1000x667)")
    p.add_argument("--image", help="use this image file instead of the bundled photo resized to --image-size")
    p.add_argument("--prompt", default=PROMPT, help="the question (wrapped in the checkpoint's template)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate, exactly (default 32)")
    p.add_argument("--batch", type=int, default=1, help="rows: the same prompt and image B times")
    p.add_argument("--repeats", type=int, default=2, help="warm runs after the cold one (default 2)")
    p.add_argument("--compare-torch", action="store_true", help="also run transformers on PyTorch")
    p.add_argument("--compile-cache", action="store_true",
                   help="let the llava-jax side use the persistent compilation cache (default: off, so that "
                   "the cold run compiles)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--make-checkpoint", metavar="DIR", help="write a random-weight benchmark checkpoint and exit")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllava", help="with --make-checkpoint")
    p.add_argument("--checkpoint-dtype", choices=["bfloat16", "float16", "float32"], default="float16",
                   help="with --make-checkpoint: the stored dtype (default float16, as llava-hf publishes)")
    p.add_argument("--seed", type=int, default=0, help="with --make-checkpoint")
    p.set_defaults(func=cmd_bench)
    return p


def _child_main(argv: list[str]) -> int:
    side, opts = argv[1], json.loads(argv[2])
    result = jax_side(opts) if side == "jax" else torch_side(opts)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        sys.exit(_child_main(sys.argv[1:]))
    from llava_jax.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
