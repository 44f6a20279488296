"""`llava-jax bench`: its arguments (`add_bench_parser`, added to the `llava-jax` parser by `llava_jax/cli.py`),
and the command: the decode floor here, then each side in its own child process (`child.py`), then the
comparison and the report."""

from __future__ import annotations

import argparse
import json

from .checkpoints import SHAPES, make_checkpoint
from .child import run_child
from .inputs import PROMPT
from .measure import common_prefix, log, machine_info, measure_bandwidth, summarize_loads, text_weight_bytes
from .report import print_report


def torch_side_opts(opts: dict, args) -> dict:
    """The transformers side's options: --torch-model in place of --model where given. A converted --model
    (llava-jax's own format, which transformers cannot read) needs it: InputError before anything runs."""
    if args.torch_model:
        return {**opts, "model": args.torch_model}
    from ..checkpoint import is_converted
    from ..errors import InputError

    if is_converted(opts["model"]):
        raise InputError(f"--compare-torch: {opts['model']} is a converted llava-jax checkpoint, which transformers "
                         "cannot read; name its safetensors source with --torch-model")
    return opts


def run_bench(args) -> dict:
    """Measure the floor, run the llava-jax side (and the PyTorch side with --compare-torch); the result."""
    from ..config import load_config
    from ..kernels import resolve_kernels
    from ..prompt import default_template, render_prompt, with_image_markers

    resolve_kernels(args.kernels)  # an unknown name fails here, with the CLI's message, not in the child
    model_dir = args.model
    if model_dir is None:
        from ..default_model import default_model_dir

        model_dir = str(default_model_dir())
    config = load_config(model_dir)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    text = render_prompt(default_template(config), [with_image_markers(args.prompt, 1)])
    opts = {"model": model_dir, "dtype": args.dtype, "image_size": [width, height], "image": args.image,
            "new_tokens": args.new_tokens, "batch": args.batch, "repeats": args.repeats, "text": text,
            "compile_cache": args.compile_cache, "mesh": args.mesh, "fsdp": args.fsdp, "kernels": args.kernels}
    torch_opts = torch_side_opts(opts, args) if args.compare_torch else None
    if args.train_step:
        return run_train_step_bench(opts, torch_opts, model_dir, args)
    weights = text_weight_bytes(config, args.dtype)
    log("measuring memory read bandwidth")
    bw = measure_bandwidth()
    floor_tok_s = bw["read_gbs"] * 1e9 / weights["read_per_token_bytes"]
    result = {
        "model": model_dir, "dtype": args.dtype, "kernels": args.kernels, "image_size": [width, height],
        "batch": args.batch, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "torch_model": torch_opts["model"] if torch_opts else None, "machine": machine_info(),
        "floor": {**weights, "bandwidth_gbs": bw["read_gbs"], "bandwidth_gbs_median": bw["read_gbs_median"],
                  "decode_floor_tok_s": floor_tok_s},
    }
    log("llava-jax side")
    jax_res = run_child("jax", opts)
    jax_res["floor_pct"] = 100 * jax_res["decode_tok_s"] / floor_tok_s
    result["jax"] = jax_res
    for key in ("prompt_tokens", "image_tokens", "crops", "prompt_bucket", "cache_len"):
        result[key] = jax_res.pop(key)
    if args.compare_torch:
        log("transformers (PyTorch) side")
        torch_res = run_child("torch", torch_opts)
        torch_res["floor_pct"] = 100 * torch_res["decode_tok_s"] / floor_tok_s
        result["torch"] = torch_res
        result["same_input_ids"] = torch_res.pop("input_ids_crc") == jax_res["input_ids_crc"]
        result["same_tokens_prefix"] = common_prefix(jax_res["tokens"], torch_res["tokens"])
        result["ratios"] = {
            "decode_speedup": jax_res["decode_tok_s"] / torch_res["decode_tok_s"],
            "ttft_ratio": jax_res["ttft_s"] / torch_res["ttft_s"],
            "ttft_cold_ratio": jax_res["ttft_cold_s"] / torch_res["ttft_cold_s"],
            "peak_rss_ratio": jax_res["peak_rss_gb"] / torch_res["peak_rss_gb"],
        }
    jax_res.pop("input_ids_crc")
    return result


def run_load_bench(args) -> dict:
    """--load-only: `llava_jax.load` (and, with --compare-torch, `from_pretrained`), each `1 + repeats` times
    in a fresh process, the sides alternating; each side's median load and its peak RSS, and the ratios."""
    model_dir = args.model
    if model_dir is None:
        from ..default_model import default_model_dir

        model_dir = str(default_model_dir())
    opts = {"model": model_dir, "dtype": args.dtype, "mesh": args.mesh, "fsdp": args.fsdp, "kernels": args.kernels}
    side_opts = {"jax": opts, **({"torch": torch_side_opts(opts, args)} if args.compare_torch else {})}
    runs: dict[str, list[dict]] = {side: [] for side in side_opts}
    for i in range(1 + args.repeats):
        for side in side_opts:
            runs[side].append(run_child(f"{side}_load", side_opts[side]))
            log(f"{side} load {i}: {runs[side][-1]['load_s']:.2f} s, peak RSS "
                f"{runs[side][-1]['load_peak_rss_gb']:.2f} GB")
    result = {"model": model_dir, "torch_model": side_opts["torch"]["model"] if args.compare_torch else None,
              "dtype": args.dtype,
              "load_only": True, "loads": 1 + args.repeats,
              "machine": machine_info()}
    result.update({side: summarize_loads(side_runs) for side, side_runs in runs.items()})
    if args.compare_torch:
        jax_res, torch_res = result["jax"], result["torch"]
        result["ratios"] = {"load_ratio": jax_res["load_s"] / torch_res["load_s"],
                            "load_cpu_ratio": jax_res["load_cpu_s"] / torch_res["load_cpu_s"],
                            "load_peak_rss_ratio": jax_res["load_peak_rss_gb"] / torch_res["load_peak_rss_gb"]}
    return result


def run_train_step_bench(opts: dict, torch_opts: dict | None, model_dir: str, args) -> dict:
    """`--train-step`: one fine-tuning step per side (`train_step.py`), fp32."""
    result = {"model": model_dir, "mode": "train_step", "dtype": "float32", "image_size": opts["image_size"],
              "batch": args.batch, "repeats": args.repeats, "machine": machine_info()}
    log("llava-jax train step")
    result["jax"] = run_child("jax_train", opts)
    if args.compare_torch:
        log("transformers (PyTorch) train step")
        result["torch"] = run_child("torch_train", torch_opts)
        result["ratios"] = {"tokens_per_s": result["jax"]["tokens_per_s"] / result["torch"]["tokens_per_s"],
                            "peak_rss": result["jax"]["peak_rss_gb"] / result["torch"]["peak_rss_gb"]}
    return result


def cmd_bench(args) -> int:
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint, args.shape, args.checkpoint_dtype, seed=args.seed, log=log)
        return 0
    if args.train_memory:
        from .train_memory import MemoryBench, format_table, train_memory_table

        result = train_memory_table(MemoryBench(shape=args.shape, rows=args.batch, kernels=args.kernels))
        print(json.dumps(result, indent=2) if args.json else format_table(result))
        return 0
    result = run_load_bench(args) if args.load_only else run_bench(args)
    if args.json or args.train_step:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


def add_bench_parser(subparsers, add_model_args) -> argparse.ArgumentParser:
    """The `bench` subcommand; `add_model_args` adds the model options every command shares (--model,
    --dtype, --mesh, --fsdp, --kernels)."""
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
    p.add_argument("--load-only", action="store_true",
                   help="time only loading the model (and its peak RSS), 1 + --repeats times per side, each in a "
                   "fresh process; the medians")
    p.add_argument("--torch-model", metavar="DIR",
                   help="with --compare-torch: the checkpoint transformers loads (default: --model); needed for a "
                   "converted --model: its safetensors source")
    p.add_argument("--compile-cache", action="store_true",
                   help="let the llava-jax side use the persistent compilation cache (default: off, so that "
                   "the cold run compiles)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--train-step", action="store_true", help="time a fine-tuning step (loss, backward, AdamW; "
                   "fp32, vision tower frozen) instead of generation; prints JSON: tokens/s and peak RSS per side")
    p.add_argument("--train-memory", action="store_true", help="the train step's memory per setting (--remat x "
                   "--precision, and --grad-accum) from the compiled program's memory analysis, nothing allocated: "
                   "--shape's decoder cut to 2 layers, --batch rows of 256 tokens; prints a Markdown table")
    p.add_argument("--make-checkpoint", metavar="DIR", help="write a random-weight benchmark checkpoint and exit")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllava",
                   help="with --make-checkpoint or --train-memory")
    p.add_argument("--checkpoint-dtype", choices=["bfloat16", "float16", "float32"], default="float16",
                   help="with --make-checkpoint: the stored dtype (default float16, as llava-hf publishes)")
    p.add_argument("--seed", type=int, default=0, help="with --make-checkpoint")
    p.set_defaults(func=cmd_bench)
    return p
