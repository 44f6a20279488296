"""The device check: one command that shows llava-jax on the machine's accelerator against PyTorch.

    python -m llava_jax.devcheck --json

On a GPU (or TPU) it builds the llava-v1.6-vicuna-7b-shaped random-weight checkpoint in bf16 (`--shape 7b`, about
14 GB on disk), then, each step in its own process (so that JAX and PyTorch never share the device):
1. logits of one LLaVA-NeXT image prompt from llava-jax and from transformers on the same device, compared;
2. decode tokens/s at batch 1 and batch 8, and the share of the device's memory bandwidth that it reaches
   (bytes a decode step reads: the decoder's weights once, plus every row's KV cache; over the step time);
3. time to first token for the image prompt (warm: the second of two runs).
On a CPU it runs the same on a toy shape (`--shape tiny`), which is how CI tests it. The last line printed is
one JSON object with `"ok"`: true when every step ran and the logits agree within the bound below.

The logits bound, bf16 on both sides: the mean |difference| under 5% of the logits' standard deviation, and the
most likely token the same at 90% of the positions or more. Each side rounds activations to bf16 (8 bits of
mantissa, 0.4% relative) at different points and sums in a different order; over 32 layers that gives per-logit
differences of a few percent of the spread, while a real error (a wrong mask, a missing image feature, a wrong
RoPE) moves the logits by their whole spread. The bound has been measured on this project's CPU toy shape (see
docs/benchmarks/devcheck-cpu.json); not yet on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .bench.checkpoints import make_checkpoint
from .bench.child import run_child
from .bench.measure import common_prefix, log

# Peak memory bandwidth (bytes/s) of accelerators by `jax.Device.device_kind` prefix; a CPU's is measured.
PEAK_BANDWIDTH = {"NVIDIA H200": 4.8e12, "NVIDIA H100": 3.35e12, "NVIDIA A100": 2.0e12, "NVIDIA L4": 3.0e11,
                  "TPU v5 lite": 8.19e11, "TPU v5": 2.76e12, "TPU v4": 1.2e12}
MEAN_BOUND, TOP1_BOUND = 0.05, 0.9
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"


def compare_logits(ours: np.ndarray, ref: np.ndarray) -> dict:
    """llava-jax logits (seq, vocab) against the reference's: the figures and the verdict of the bound."""
    diff = np.abs(ours.astype(np.float64) - ref)
    spread = float(ref.std())
    out = {"mean_abs_diff_over_std": float(diff.mean() / spread), "max_abs_diff_over_std": float(diff.max() / spread),
           "top1_agreement": float(np.mean(ours.argmax(-1) == ref.argmax(-1))), "logits_std": spread,
           "bound": {"mean_abs_diff_over_std": MEAN_BOUND, "top1_agreement": TOP1_BOUND}}
    out["ok"] = out["mean_abs_diff_over_std"] < MEAN_BOUND and out["top1_agreement"] >= TOP1_BOUND
    return out


def bandwidth_share(res: dict, batch: int, cfg, dtype_bytes: int, peak: float) -> dict:
    """Bytes a decode step reads (weights once, each row's KV cache) and that rate against the device's peak."""
    text = cfg.text
    cache_bytes = 2 * text.num_layers * res["cache_len"] * text.num_kv_heads * text.head_dim * dtype_bytes
    step_bytes = res["read_per_token_bytes"] + batch * cache_bytes
    steps_s = res["decode_tok_s"]  # per row: one step makes one token in every row
    return {"tok_s": steps_s * batch, "steps_s": steps_s, "bytes_per_step": step_bytes,
            "bandwidth_gbs": step_bytes * steps_s / 1e9, "bandwidth_pct": 100 * step_bytes * steps_s / peak}


def run_check(shape: str, workdir: Path, new_tokens: int, image_size: tuple[int, int], device: str,
              batches: tuple[int, ...] = (1, 8)) -> dict:
    from .config import load_config

    t0 = time.perf_counter()
    ckpt = workdir / f"devcheck-{shape}-bf16"
    if not (ckpt / "config.json").exists():
        log(f"writing the {shape} random-weight checkpoint (bf16) to {ckpt}")
        make_checkpoint(ckpt, shape, dtype="bfloat16")
    cfg = load_config(str(ckpt))
    base = {"model": str(ckpt), "dtype": "bfloat16", "image_size": list(image_size), "image": None, "text": PROMPT,
            "device": device, "mesh": "auto", "fsdp": False, "kernels": "auto", "compile_cache": False}
    result: dict = {"shape": shape, "dtype": "bfloat16", "checkpoint": str(ckpt), "new_tokens": new_tokens,
                    "image_size": list(image_size)}

    log("logits: llava-jax, then transformers")
    files = {side: str(workdir / f"logits-{side}.npy") for side in ("jax", "torch")}
    jax_l = run_child("jax_logits", {**base, "out": files["jax"]})
    torch_l = run_child("torch_logits", {**base, "out": files["torch"]})
    result["logits"] = compare_logits(np.load(files["jax"]), np.load(files["torch"]))
    result["logits"]["same_input_ids"] = jax_l["input_ids_crc"] == torch_l["input_ids_crc"]
    result["torch_device"] = torch_l["device"]

    result["decode"] = {}
    for batch in batches:
        opts = {**base, "batch": batch, "new_tokens": new_tokens, "repeats": 1}
        log(f"batch {batch}: llava-jax, then transformers")
        jax_r, torch_r = run_child("jax", opts), run_child("torch", opts)
        if batch == batches[0]:
            result["backend"], result["device_kind"] = jax_r["backend"], jax_r["device_kind"]
            result["kernels"] = jax_r["kernels"]
            peak = next((v for k, v in PEAK_BANDWIDTH.items() if result["device_kind"].startswith(k)), None)
            if peak is None and result["backend"] == "cpu":
                from .bench.measure import measure_bandwidth

                peak = measure_bandwidth()["read_gbs"] * 1e9
            result["peak_bandwidth_gbs"] = None if peak is None else peak / 1e9
            result["ttft_s"] = {"jax": jax_r["ttft_s"], "torch": torch_r["ttft_s"],
                                "ratio": jax_r["ttft_s"] / torch_r["ttft_s"]}
        torch_r["cache_len"], torch_r["read_per_token_bytes"] = jax_r["cache_len"], jax_r["read_per_token_bytes"]
        row = {}
        for side, res in (("jax", jax_r), ("torch", torch_r)):
            row[side] = (bandwidth_share(res, batch, cfg, 2, peak) if peak else
                         {"tok_s": res["decode_tok_s"] * batch, "steps_s": res["decode_tok_s"]})
        row["speedup"] = row["jax"]["tok_s"] / row["torch"]["tok_s"]
        row["same_tokens_prefix"] = common_prefix(jax_r["tokens"], torch_r["tokens"])
        result["decode"][str(batch)] = row
    result["wall_s"] = time.perf_counter() - t0
    result["ttft_s"]["note"] = f"batch {batches[0]}, warm (second of two runs)"
    result["ok"] = bool(result["logits"]["ok"] and result["logits"]["same_input_ids"])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.devcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="auto", choices=("auto", "7b", "tinyllava", "tiny"),
                        help="checkpoint shape (auto: 7b on an accelerator, tiny on a CPU)")
    parser.add_argument("--workdir", default=None, help="where the checkpoint and logits go (default: a temp dir)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--image-size", default="1000x667", help="WIDTHxHEIGHT of the test image")
    parser.add_argument("--batches", default="1,8", help="decode batch sizes, comma-separated")
    parser.add_argument("--torch-device", default="auto", help="cpu, cuda or auto (CUDA where torch sees a GPU)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result (last line)")
    args = parser.parse_args(argv)
    shape = args.shape
    if shape == "auto":
        shape = "7b" if _accelerator_present() else "tiny"
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="llava-jax-devcheck-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
        result = run_check(shape, workdir, args.new_tokens, (width, height), args.torch_device, batches)
    except Exception as e:  # the one JSON line must come out whatever failed
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "shape": shape}
    if not args.json:
        log(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def _accelerator_present() -> bool:
    """A GPU or TPU, judged without initializing JAX in this process (the children own the device)."""
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        return False
    return Path("/dev/nvidia0").exists() or Path("/dev/accel0").exists() or Path("/dev/vfio").exists()


if __name__ == "__main__":
    sys.exit(main())
