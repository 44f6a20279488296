"""The `llava-jax` command: `generate`, `chat`, `bench`, `serve` and `bench-serve`.

User errors (bad values, unreadable files or images, checkpoints that cannot be read) print one line,
`llava-jax: error: ...`, and exit with status 2, never a traceback; in `chat` they end only the message that
caused them: the conversation goes on.
"""

from __future__ import annotations

import argparse
import os
import sys

from .xla_flags import enable_compilation_cache, set_default_xla_flags

DEFAULT_MODEL_NOTICE = (
    "llava-jax: no --model given: using the embedded default model, a TOY LLaVA-NeXT trained on synthetic pictures "
    "of one coloured shape on white; it answers 'What color is the shape?' and 'What shape is this?' and nothing "
    "else. Pass --model DIR to use a real checkpoint."
)


def _open_image(source: str):
    """A path, or an http(s) URL (fetched only because the user gave one, within `url_image`'s limits)."""
    from .url_image import fetch_image, is_url

    return fetch_image(source) if is_url(source) else source


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, `PROG: error: ...` (the command's first word), with
    exit status 2, like every other user error of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog.split()[0]}: error: {' '.join(message.split())}\n")


def _arg(check, parse):
    """An argparse `type`: parse the string, then a `validation` check; its message becomes argparse's."""
    from .errors import InputError

    def convert(text: str):
        try:
            return check(parse(text))
        except ValueError as e:
            if isinstance(e, InputError):
                raise argparse.ArgumentTypeError(str(e)) from e
            kind = {int: "an integer", float: "a number"}.get(parse, parse.__name__)
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from e

    convert.__name__ = parse.__name__
    return convert


def positive(parse):
    """An argparse `type` for a number > 0 (`positive(int)`, `positive(float)`), errors as `_arg`'s."""
    from .errors import InputError

    def check(value):
        if not value > 0:
            raise InputError(f"{value!r} must be > 0")
        return value

    return _arg(check, parse)


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

        print(DEFAULT_MODEL_NOTICE, file=sys.stderr)
        model = llava_jax.load(str(default_model_dir()), dtype=args.dtype, **placement)
    import jax

    if jax.process_index() != 0:  # multi-host: every process computes the same answer; one prints it
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    return model


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (llava-hf or original safetensors, or converted); "
                   "default: the embedded toy model trained on synthetic shapes")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mesh", default="auto",
                   help="device mesh for params, KV cache and batch, e.g. data=2,model=4 (one size may be -1: the "
                   "rest); 'auto' (default): every device, the model axis as wide as the heads allow within a "
                   "host; 'none': one device")
    p.add_argument("--fsdp", action="store_true",
                   help="also shard the embedding dimension of weight matrices over the data axis")
    p.add_argument("--kernels", default="auto",
                   help="backend kernel set: auto (default: the backend's), reference, xla_cpu, gpu or tpu")
    p.add_argument("--no-verify", action="store_true",
                   help="skip hashing the checkpoint's files against its checksums.json when loading (files are "
                   "still checked to exist with their sizes; LLAVA_JAX_VERIFY=0 does the same)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from . import validation as v

    p.add_argument("--max-new-tokens", type=_arg(v.check_max_new_tokens, int), default=128,
                   help="an integer >= 1 (default 128)")
    p.add_argument("--temperature", type=_arg(v.check_temperature, float), default=0.0,
                   help="a finite number >= 0; 0 = greedy (default)")
    p.add_argument("--top-p", type=_arg(v.check_top_p, float), help="nucleus sampling, in (0, 1]")
    p.add_argument("--top-k", type=_arg(v.check_top_k, int), help="sample among the k likeliest tokens, k >= 1")
    p.add_argument("--seed", type=_arg(v.check_seed, int), default=0)
    p.add_argument("--stop", type=_arg(lambda s: v.check_stop(s)[0], str), action="append", default=[],
                   help="stop string, not empty (repeatable)")
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


class _Answer:
    """Streams one chat answer to stdout, writing the `ASSISTANT> ` prefix with its first text."""

    def __init__(self):
        self.started = False

    def __call__(self, _row: int, text: str) -> None:
        if not self.started:
            sys.stdout.write("ASSISTANT> ")
            self.started = True
        _print_delta(_row, text)

    def finish(self) -> None:
        if not self.started:
            sys.stdout.write("ASSISTANT> ")
        sys.stdout.write("\n")
        sys.stdout.flush()


def cmd_chat(args) -> int:
    from .image import load_image

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
            try:
                img = _open_image(path)
                load_image(img)  # fail now, not at the next message
            except USER_ERRORS as e:  # the conversation goes on without this image
                _report(e)
                continue
            pending.append(img)
            continue
        answer = _Answer()
        try:
            session.ask(line, images=pending, stream=answer)
        except USER_ERRORS as e:  # the session is unchanged: the message and its images were not added
            if answer.started:
                sys.stdout.write("\n")
                sys.stdout.flush()
            _report(e)
            if pending:
                print(f"llava-jax: the {len(pending)} image(s) attached to that message were dropped; attach "
                      "them again with /image", file=sys.stderr)
            pending = []
            continue
        pending = []
        answer.finish()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import add_bench_parser
    from .serve.cli import add_serve_parser

    parser = OneLineParser(prog="llava-jax", description="LLaVA-1.5 / LLaVA-NeXT in JAX")
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
    from .train import data_cli, train_cli

    data_cli.register(sub, _add_model_args)
    train_cli.register(sub, _add_model_args)
    add_serve_parser(sub, _add_model_args)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .errors import CheckpointError, InputError

    # OSError: unreadable files, permissions, a full disk; the message names the file.
    return InputError, CheckpointError, ConfigError, OSError


USER_ERRORS = _user_errors()


def _report(error: BaseException) -> None:
    """Print a user error as one line on stderr."""
    print(f"llava-jax: error: {' '.join(str(error).split())}", file=sys.stderr)


def main(argv=None) -> int:
    set_default_xla_flags()  # before jax starts its backend
    args = build_parser().parse_args(argv)
    if getattr(args, "no_verify", False):  # through the environment: bench's worker processes inherit it
        from .integrity import VERIFY_ENV

        os.environ[VERIFY_ENV] = "0"
    enable_compilation_cache()
    try:
        return args.func(args)
    except USER_ERRORS as e:
        _report(e)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
