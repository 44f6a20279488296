"""`llava-jax make-dataset` and `llava-jax eval`."""

from __future__ import annotations

import argparse
import json
import sys


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def cmd_make_dataset(args) -> int:
    from .shapes import make_shapes_dataset

    paths = make_shapes_dataset(args.dir, train=args.train, test=args.test, seed=args.seed, force=args.force,
                                progress=not args.quiet)
    print(f"wrote the {args.kind} dataset to {paths['image_folder']}: {args.train} training and {args.test} test "
          f"pictures\n  stage 1: --data {paths['pretrain']} --image-folder {paths['image_folder']} --stage pretrain"
          f"\n  stage 2: --data {paths['finetune']} --image-folder {paths['image_folder']} --stage finetune"
          f"\n  eval:    --data {paths['test']} --image-folder {paths['image_folder']}")
    return 0


def cmd_eval(args) -> int:
    from ..cli import _load_model
    from .data import load_dataset
    from .evaluate import evaluate

    examples, skipped = load_dataset(args.data, args.image_folder, skip_bad=args.skip_bad, progress=not args.quiet)
    for message in skipped:
        print(f"llava-jax: skipped {message}", file=sys.stderr)
    model = _load_model(args)
    result = evaluate(model, examples, template=args.template, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, progress=not args.quiet)
    if args.json:
        print(json.dumps({k: result[k] for k in ("accuracy", "n", "correct")}))
    else:
        print(f"accuracy {result['accuracy']:.4f} ({result['correct']} of {result['n']} answers right)")
    return 0


def register(sub, add_model_args) -> None:
    """Add the data subcommands to the `llava-jax` parser."""
    m = sub.add_parser("make-dataset", help="write a synthetic LLaVA-format dataset (coloured shapes)",
                       description="Draw pictures of coloured shapes and write LLaVA-format pretrain.json (captions), "
                       "finetune.json (one-word questions and answers), test.json (held-out pictures) and images/ "
                       "into DIR; the same seed gives the same files.")
    m.add_argument("kind", choices=["shapes"], help="the dataset (shapes)")
    m.add_argument("dir", metavar="DIR", help="output directory (must not exist, unless --force)")
    m.add_argument("--train", type=_at_least_one, default=1000, help="training pictures (1000)")
    m.add_argument("--test", type=_at_least_one, default=200, help="held-out test pictures (200)")
    m.add_argument("--seed", type=int, default=0, help="random seed (0)")
    m.add_argument("--force", action="store_true", help="replace an earlier dataset in DIR")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=cmd_make_dataset)

    e = sub.add_parser("eval", help="question-answering accuracy on LLaVA-format data",
                       description="Answer the first question of each row greedily and compare it with the row's "
                       "first answer (exact match after lower-casing, cutting at the first newline and stripping "
                       "punctuation and whitespace); prints the accuracy.")
    add_model_args(e)
    e.add_argument("--data", required=True, help="LLaVA-format JSON file")
    e.add_argument("--image-folder", help="directory the rows' image paths are relative to")
    e.add_argument("--template", help="conversation template (default: the model's)")
    e.add_argument("--max-new-tokens", type=_at_least_one, default=16, help="answer length limit (16)")
    e.add_argument("--batch-size", type=_at_least_one, default=8, help="questions per generate call (8)")
    e.add_argument("--json", action="store_true", help='print one JSON line {"accuracy", "n", "correct"}')
    e.add_argument("--skip-bad", action="store_true", help="skip unusable rows (reported) instead of failing")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)
