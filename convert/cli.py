"""`llava-jax-convert SRC OUT` / `python -m convert SRC OUT`: convert a LLaVA safetensors checkpoint once, then
load it fast with `llava_jax.load(OUT)`.

Exit status: 0 on success, 2 on bad input or a failed write (one line, `llava-jax-convert: error: ...`, saying
what and how to fix it; usage errors too), 130 on Ctrl-C. On any failure OUT is left as it was and no
partial output remains.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def parser() -> argparse.ArgumentParser:
    from llava_jax.cli import OneLineParser

    p = OneLineParser(
        prog="llava-jax-convert",
        description="Convert a LLaVA safetensors checkpoint (llava-hf LLaVA-1.5 / LLaVA-NeXT, or the original "
        "liuhaotian layout) to a llava-jax checkpoint directory: an Orbax checkpoint of the param tree, the "
        "normalized config and the tokenizer/processor files. Streams tensor by tensor: memory stays near the "
        "largest single tensor. Reads safetensors only (never pickles).",
    )
    p.add_argument("src", metavar="SRC", help="source checkpoint directory (config.json + *.safetensors)")
    p.add_argument("out", metavar="OUT", help="output directory (written atomically)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype to store params in (default: keep the checkpoint's)")
    p.add_argument("--layout", choices=("auto", "hf", "original"), default="auto",
                   help="tensor naming of SRC (default: detected from the config and the tensor names)")
    p.add_argument("--vision-tower", metavar="DIR", default=None,
                   help="CLIP safetensors checkpoint for original LLaVA-1.5 checkpoints, which hold no vision tower "
                   "(e.g. a local copy of openai/clip-vit-large-patch14-336)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it exists, once the new one is complete; only an earlier conversion is "
                   "replaced: a directory holding anything a conversion does not write is refused")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Orbax logs through absl: INFO lines per step, and a writer failure as an ERROR with a traceback. The
    # failure reaches us as an exception and is reported below, once.
    logging.getLogger("absl").setLevel(logging.CRITICAL)

    from llava_jax.config import ConfigError
    from llava_jax.errors import CheckpointError, InputError

    from .atomic import DestinationError, check_destination
    from .converter import convert, foreign_entries, prepare_conversion

    def fail(message: str) -> int:
        print(f"llava-jax-convert: error: {message}", file=sys.stderr)
        return 2

    try:
        check_destination(args.out, args.force, foreign_entries,
                          [args.src] + ([args.vision_tower] if args.vision_tower else []))
        conversion = prepare_conversion(args.src, args.dtype, args.layout, args.vision_tower)
    except (CheckpointError, ConfigError, InputError, OSError) as e:  # DestinationError is an OSError
        return fail(str(e))
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        c = conversion
        print(f"{args.src}: {c.source.config.model_type} ({c.source.config.layout} layout), {c.tensors} tensors, "
              f"{_size(c.source_bytes)} ({', '.join(f'{k} x{n}' for k, n in c.source_dtypes.items())}); "
              f"{len(c.skipped)} known-unused tensors skipped", file=sys.stderr)
        bar = tqdm(total=c.source_bytes, unit="B", unit_scale=True, desc="converting",
                   file=sys.stderr, dynamic_ncols=True)
        done = [0]

        def progress(nbytes: int, tensors: int) -> None:
            done[0] += tensors
            bar.set_postfix_str(f"{done[0]}/{c.tensors} tensors", refresh=False)
            bar.update(nbytes)
    try:
        report = convert(args.src, args.out, args.dtype, args.layout, args.vision_tower, args.force,
                         progress=None if bar is None else progress, conversion=conversion)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print(f"llava-jax-convert: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    except (CheckpointError, ConfigError, InputError, DestinationError, OSError) as e:
        if bar is not None:
            bar.close()
        message = " ".join(str(e).split("\n")[0].split())  # one line
        return fail(f"{message} ({args.out} was not written)" if not isinstance(e, DestinationError) else message)
    for path in report.stale.removed:
        print(f"llava-jax-convert: removed {path}, left by an interrupted conversion", file=sys.stderr)
    for path in report.stale.kept:
        print(f"llava-jax-convert: left {path} alone (a conversion still running, or not safely removable)",
              file=sys.stderr)
    if bar is not None:
        bar.close()
        c = report.conversion
        print(f"wrote {report.out}: {c.param_count} params, {_size(c.param_bytes)}, in {report.seconds:.1f} s "
              f"(load it with llava_jax.load({report.out!r}))", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
