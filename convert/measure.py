"""Measure the converter: peak memory and time on a synthetic checkpoint of a few GB (a script, not a test).

    python -m convert.measure [--dir DIR] [--dtype bfloat16] [--layers 8] [--hidden 2048] [--keep]

Writes a llava-hf LLaVA-NeXT checkpoint with random weights (real CLIP ViT-L/14-336 shapes, a Llama decoder of
the given size; `llava_jax.random_checkpoint`, 2 GB shards), then runs each step in a fresh subprocess and reports its
peak RSS (`ru_maxrss`) and wall time: importing everything (the fixed overhead), converting, loading the
converted directory, loading the safetensors source. Deletes everything afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def synthetic_checkpoint(path: str, hidden: int, layers: int, mlp: int, vocab: int, dtype: str) -> None:
    """A llava-hf LLaVA-NeXT checkpoint with random weights (real CLIP ViT-L/14-336 shapes, a Llama decoder of
    the given size), written by the project's one random-checkpoint writer, in 2 GB shards with an index."""
    from llava_jax.random_checkpoint import write_random_checkpoint

    heads = hidden // 128
    text = dict(model_type="llama", hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab, rms_norm_eps=1e-5,
                max_position_embeddings=4096, tie_word_embeddings=False)
    config = dict(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
                  vision_config=VISION, text_config=text, image_token_index=32000, projector_hidden_act="gelu",
                  image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                  vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)
    write_random_checkpoint(path, config, dtype)


# Peak RSS is VmHWM, the high-water mark of this process's own address space (ru_maxrss would carry over
# the parent's across fork + exec).
RUN = """
import time
t = time.monotonic()
{body}
seconds = time.monotonic() - t
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print("RESULT", seconds, int(hwm) * 1024)
"""
IMPORTS = "import jax, orbax.checkpoint, tensorstore, llava_jax, llava_jax.checkpoint, convert.converter"


def run(body: str) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", RUN.format(body=body)], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    if out.returncode or not lines:
        raise RuntimeError(out.stderr[-3000:])
    _, seconds, rss = lines[-1].split()
    return float(seconds), int(rss)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m convert.measure")
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--disk-dtype", default="bfloat16")
    p.add_argument("--dtype", default=None, help="--dtype for the conversion (default: keep)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--no-load", action="store_true", help="measure the conversion only")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="llava-jax-measure-")
    src, out = os.path.join(work, "src"), os.path.join(work, "out")
    try:
        if not os.path.isdir(src):
            t = time.monotonic()
            synthetic_checkpoint(src, args.hidden, args.layers, args.mlp, args.vocab, args.disk_dtype)
            print(f"wrote the source in {time.monotonic() - t:.1f} s")
        from llava_jax.safetensors_io import iter_tensors

        refs = list(iter_tensors(src))
        size, largest = sum(r.nbytes for r in refs), max(r.nbytes for r in refs)
        shutil.rmtree(out, ignore_errors=True)
        load_dtype = args.dtype or args.disk_dtype
        steps = {
            "imports (fixed overhead)": IMPORTS,
            "convert": f"{IMPORTS}\nconvert.converter.convert({src!r}, {out!r}, dtype={args.dtype!r})",
            "load converted": f"{IMPORTS}\nm = llava_jax.load({out!r}, dtype={load_dtype!r}, mesh=None)\n"
                              "jax.block_until_ready(m.params)",
            "load safetensors source": f"{IMPORTS}\nm = llava_jax.load({src!r}, dtype={load_dtype!r}, mesh=None)\n"
                                       "jax.block_until_ready(m.params)",
        }
        if args.no_load:
            steps = {k: v for k, v in steps.items() if not k.startswith("load")}
        gb = 1e9
        print(f"checkpoint {size / gb:.2f} GB in {len(refs)} tensors ({args.disk_dtype}), largest tensor "
              f"{largest / gb:.3f} GB; conversion dtype {args.dtype or 'kept'}")
        base = None
        for name, body in steps.items():
            seconds, rss = run(body)
            base = rss if base is None else base
            extra = rss - base
            print(f"{name:26s} {seconds:7.1f} s  peak RSS {rss / gb:6.2f} GB  above imports {extra / gb:6.2f} GB "
                  f"= {extra / size:5.2f} x checkpoint = {extra / largest:6.2f} x largest tensor")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
