"""The `llava-jax` command: `generate`, `chat` and `bench`."""

from __future__ import annotations

import argparse
import io
import os
import sys

from .xla_flags import enable_compilation_cache, set_default_xla_flags

RANDOM_WEIGHTS_NOTICE = (
    "llava-jax: no --model given: using the embedded default model, a tiny LLaVA-NeXT with RANDOM weights and "
    "the real Mistral tokenizer. Its answers are noise; pass --model DIR to use a real checkpoint."
)


def _open_image(source: str):
    """A path, or an http(s) URL (fetched only because the user gave one)."""
    if source.startswith(("http://", "https://")):
        import urllib.request

        from PIL import Image

        from .image import ImageError

        try:
            with urllib.request.urlopen(source, timeout=30) as resp:  # noqa: S310 (user-given URL)
                data = resp.read()
            return Image.open(io.BytesIO(data))
        except Exception as e:  # network errors, bad image data
            raise ImageError(f"could not fetch image {source}: {e}") from e
    return source


def _load_model(args):
    import llava_jax

    from .sharding import maybe_initialize_distributed

    maybe_initialize_distributed()  # multi-host: before anything touches the devices
    placement = dict(mesh=getattr(args, "mesh", "auto"), fsdp=getattr(args, "fsdp", False),
                     kernels=getattr(args, "kernels", "auto"))
    if args.model:
        model = llava_jax.load(args.model, dtype=args.dtype, **placement)
    else:
        from .default_model import default_model_dir

        print(RANDOM_WEIGHTS_NOTICE, file=sys.stderr)
        model = llava_jax.load(str(default_model_dir()), dtype=args.dtype, **placement)
    import jax

    if jax.process_index() != 0:  # multi-host: every process computes the same answer; one prints it
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    return model


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (llava-hf or original safetensors, or converted); "
                   "default: the embedded tiny random-weight model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mesh", default="auto",
                   help="device mesh for params, KV cache and batch, e.g. data=2,model=4 (one size may be -1: the "
                   "rest); 'auto' (default): every device, the model axis as wide as the heads allow within a "
                   "host; 'none': one device")
    p.add_argument("--fsdp", action="store_true",
                   help="also shard the embedding dimension of weight matrices over the data axis")
    p.add_argument("--kernels", default="auto",
                   help="backend kernel set: auto (default: the backend's), reference, xla_cpu, gpu or tpu")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--template", help="conversation template (default: from the checkpoint); 'raw' = none")
    p.add_argument("--system", help="replace the template's system message")


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=args.stop)


def _print_delta(_row: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(args) -> int:
    model = _load_model(args)
    images = [_open_image(s) for s in args.image]
    model.generate(args.prompt, images=images, template=args.template, system=args.system,
                   stream=_print_delta, **_sampling(args))
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    model = _load_model(args)
    session = model.chat(template=args.template, system=args.system, **_sampling(args))
    pending = [_open_image(s) for s in args.image]
    interactive = sys.stdin.isatty()
    if interactive:
        print("llava-jax chat: type a message; '/image PATH' attaches an image to your next message; "
              "'/reset' starts over; '/quit' or Ctrl-D ends.", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("USER> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session = model.chat(template=args.template, system=args.system, **_sampling(args))
            pending = []
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not path:
                print("usage: /image PATH_OR_URL", file=sys.stderr)
                continue
            from .image import load_image

            img = _open_image(path)
            load_image(img)  # fail now, not at the next message
            pending.append(img)
            continue
        sys.stdout.write("ASSISTANT> ")
        session.ask(line, images=pending, stream=_print_delta)
        pending = []
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import add_bench_parser

    parser = argparse.ArgumentParser(prog="llava-jax", description="LLaVA-1.5 / LLaVA-NeXT in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt about zero or more images")
    _add_model_args(g)
    g.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    g.add_argument("--prompt", required=True)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive multi-turn chat on stdin")
    _add_model_args(c)
    c.add_argument("--image", action="append", default=[], help="image for the first message (repeatable)")
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)
    add_bench_parser(sub, _add_model_args)
    return parser


def main(argv=None) -> int:
    set_default_xla_flags()  # before jax starts its backend
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .errors import InputError
    from .image import ImageError
    from .prompt import PromptError
    from .safetensors_io import CheckpointError

    enable_compilation_cache()
    try:
        return args.func(args)
    except (InputError, ImageError, PromptError, CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"llava-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
