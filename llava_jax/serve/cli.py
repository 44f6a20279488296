"""`llava-jax serve` and `llava-jax bench-serve`: their arguments (`add_serve_parser`, added to the `llava-jax`
parser by `llava_jax/cli.py`) and commands."""

from __future__ import annotations

import argparse
import sys

from ..cli import positive


def _log(message: str) -> None:
    print(f"llava-jax serve: {message}", file=sys.stderr, flush=True)


def _buckets(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from e
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: prompt buckets must be >= 1")
    return values


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-batch", type=positive(int), default=16,
                   help="decode slots: requests decoded together (default 16)")
    p.add_argument("--max-queue", type=positive(int), default=64,
                   help="requests that may wait for a slot; more get HTTP 429 (default 64)")
    p.add_argument("--context", type=positive(int),
                   help="cache entries per slot: padded prompt + answer (default: the model's context, at most 4096)")
    p.add_argument("--prompt-buckets", type=_buckets,
                   help="padded prompt lengths, comma-separated, each below --context (default: powers of two from "
                   "64 to half the context, then 5/8, 6/8, 7/8 of it); one prefill program each")
    p.add_argument("--steps-per-call", type=positive(int), default=4,
                   help="decode steps per device call: more spread the host's per-call work over more tokens, fewer "
                   "let a new request start sooner (default 4)")
    p.add_argument("--template", help="conversation template (default: from the checkpoint)")


def add_serve_parser(subparsers, add_model_args) -> None:
    """The `serve` and `bench-serve` subcommands; `add_model_args` adds --model, --dtype, --mesh, ..."""
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    _add_server_args(p)
    p.add_argument("--max-tokens-default", type=positive(int), default=256,
                   help="max_tokens when a request gives none (at most what its prompt leaves; default 256)")
    p.add_argument("--max-images", type=positive(int), default=8, help="images per request (default 8)")
    p.add_argument("--max-body-mb", type=positive(float), default=32.0, help="request body limit (default 32 MB)")
    p.add_argument("--max-image-mb", type=positive(float), default=20.0,
                   help="limit on one image's encoded bytes (default 20 MB)")
    p.add_argument("--max-image-pixels", type=positive(int), default=4096 * 4096,
                   help="limit on one image's width x height (default 16,777,216)")
    p.add_argument("--allow-local-images", metavar="DIR",
                   help="accept image_url file paths inside DIR (default: no local files)")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (default: off)")
    p.add_argument("--remote-timeout", type=positive(float), default=10.0,
                   help="seconds to fetch a remote image (default 10)")
    p.add_argument("--request-timeout", type=positive(float), default=300.0,
                   help="seconds a request may take, waiting included; then HTTP 504 (default 300)")
    p.set_defaults(func=cmd_serve)
    b = subparsers.add_parser("bench-serve", help="throughput and latency of the server at 1, 4 and 16 concurrent "
                              "clients, against the same requests one after another with generate")
    add_model_args(b)
    _add_server_args(b)
    b.add_argument("--requests", type=positive(int), default=32, help="requests per concurrency level (default 32)")
    b.add_argument("--clients", default="1,4,16", help="concurrency levels (default 1,4,16)")
    b.add_argument("--max-tokens", type=positive(int), default=64, help="max_tokens of every request (default 64)")
    b.add_argument("--image", action="store_true", help="every request carries the example photo")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=cmd_bench_serve)


def _model_and_id(args):
    from ..cli import _load_model
    from .app import model_id_for

    return _load_model(args), model_id_for(args.model)


def cmd_serve(args) -> int:
    import os

    import uvicorn

    from .app import ServerLimits, build_app
    from .images import ImagePolicy
    from .server import create_server

    if args.allow_local_images is not None and not os.path.isdir(args.allow_local_images):
        from ..errors import InputError

        raise InputError(f"--allow-local-images {args.allow_local_images}: not a directory")
    model, model_id = _model_and_id(args)
    policy = ImagePolicy(max_image_bytes=int(args.max_image_mb * 2**20), max_pixels=args.max_image_pixels,
                         local_dir=args.allow_local_images, allow_remote=args.allow_remote_images,
                         remote_timeout_s=args.remote_timeout)
    limits = ServerLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_images=args.max_images,
                          default_max_tokens=args.max_tokens_default, request_timeout_s=args.request_timeout,
                          images=policy)
    server = create_server(model, model_id=model_id, max_batch=args.max_batch, max_queue=args.max_queue,
                           context=args.context, buckets=args.prompt_buckets, steps_per_call=args.steps_per_call,
                           template=args.template, limits=limits, log=_log)
    _log(f"serving {model_id!r} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)")
    try:
        uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)
    finally:
        server.scheduler.stop()
    return 0


def cmd_bench_serve(args) -> int:
    import json

    from .bench import print_table, run_bench_serve

    model, model_id = _model_and_id(args)
    clients = [int(c) for c in args.clients.split(",")]
    result = run_bench_serve(model, model_id, clients=clients, requests=args.requests, max_tokens=args.max_tokens,
                             max_batch=args.max_batch, max_queue=args.max_queue, context=args.context,
                             buckets=args.prompt_buckets, steps_per_call=args.steps_per_call, template=args.template,
                             image=args.image, log=_log)
    print(json.dumps(result, indent=2) if args.json else print_table(result))
    return 0
