"""`llava-jax train` and `llava-jax export`."""

from __future__ import annotations

from ..cli import positive


def register(sub, add_model_args) -> None:
    """Add the training subcommands to the `llava-jax` parser."""
    from ..export import register_export

    t = sub.add_parser("train", help="fine-tune a model on LLaVA-format data (stage pretrain or finetune)",
                       description="Train the projector (--stage pretrain, template plain) or the projector and "
                       "the language model (--stage finetune) with AdamW, linear warmup then cosine decay, "
                       "gradient clipping at norm 1.0. OUT receives the trained model (llava_jax.load(OUT)), "
                       "metrics.jsonl and train-state checkpoints (--resume continues from the newest).")
    t.add_argument("--model", help="checkpoint directory to start from; default: the embedded toy model "
                   "trained on synthetic shapes (make-default --base-only writes the random-weight one it started "
                   "from)")
    t.add_argument("--data", required=True, help="LLaVA-format JSON: a list of {id, image, conversations}")
    t.add_argument("--image-folder", required=True, help="directory the JSON's image paths are relative to")
    t.add_argument("--output", required=True, help="output directory (model, metrics.jsonl, checkpoints/)")
    t.add_argument("--stage", required=True, choices=["pretrain", "finetune"])
    t.add_argument("--template", help="conversation template (default: plain for pretrain, the model's for "
                   "finetune)")
    t.add_argument("--lr", type=positive(float), help="peak learning rate (default 1e-3 pretrain, 2e-5 finetune)")
    t.add_argument("--warmup-ratio", type=float, default=0.03, help="share of the steps spent warming up (0.03)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0, as the original)")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive(float), default=1.0, help="passes over the data (default 1)")
    length.add_argument("--steps", type=positive(int), help="optimizer steps (instead of --epochs)")
    t.add_argument("--batch-size", type=positive(int), default=4, help="examples per micro-batch (4)")
    t.add_argument("--grad-accum", type=positive(int), default=1, help="micro-batches per optimizer step (1)")
    t.add_argument("--max-length", type=positive(int), default=2048,
                   help="longest row after image expansion (2048); longer rows are refused, see --truncate")
    t.add_argument("--truncate", action="store_true", help="cut rows longer than --max-length after image "
                   "expansion, as the original model does, instead of refusing them")
    t.add_argument("--seed", type=int, default=0, help="data order seed (0)")
    t.add_argument("--save-every", type=positive(int), help="save the train state every N optimizer steps")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    t.add_argument("--skip-bad", action="store_true", help="skip unusable rows (reported) instead of failing")
    t.add_argument("--train-vision-tower", action="store_true", help="also train the vision tower")
    t.add_argument("--vision-lr", type=positive(float), help="the vision tower's lr (default: --lr)")
    t.add_argument("--mesh", default="auto",
                   help="device mesh for params, optimizer state and batches, e.g. data=2,model=4 (one size may be "
                   "-1: the rest); 'auto' (default): every device, as at inference; 'none': one device")
    t.add_argument("--fsdp", action="store_true", help="also shard params and optimizer state over the data axis")
    t.add_argument("--remat", choices=["none", "dots", "full"], default="none",
                   help="per-layer rematerialization: none (keep all activations), dots (keep the weight matmuls' "
                   "outputs, recompute the rest), full (keep each layer's input only)")
    t.add_argument("--precision", choices=["fp32", "mixed", "bf16"], default="fp32",
                   help="fp32; mixed: fp32 master params and optimizer state, bf16 compute; bf16: bf16 params and "
                   "optimizer state")
    t.add_argument("--lora-r", type=int, help="train LoRA adapters of this rank (with the projector) instead of the "
                   "language model's weights (--stage finetune); OUT/adapter holds them alone")
    t.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator: updates are scaled by "
                   "alpha / r (16)")
    t.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input (0.05)")
    t.add_argument("--lora-targets", help="comma-separated maps to adapt (default: all of the language model's: "
                   "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)
    register_export(sub)

    m = sub.add_parser("make-default", help="train the embedded default model from scratch (its fixed recipe)",
                       description="Run the recipe of the shipped default model: random weights, the synthetic "
                       "shapes data, stage 1 then stage 2, evaluation; write model.safetensors (fp16), config.json, "
                       "checksums.json and recipe.json (settings, held-out accuracy, every step's loss) into OUT. "
                       "Seed 0 reproduces llava_jax/assets/default-model bit for bit (--check compares).")
    m.add_argument("out", metavar="OUT", help="output directory (must not exist, unless --force)")
    m.add_argument("--seed", type=int, default=0, help="seed of the weights, the pictures and the data order (0)")
    m.add_argument("--base-only", action="store_true", help="write only the recipe's starting point into OUT: "
                   "the random-weight model, a checkpoint directory for --model")
    m.add_argument("--work", help="keep the base model, dataset and stage outputs here (default: a temporary "
                   "directory)")
    m.add_argument("--check", action="store_true", help="then compare the weights with the shipped default's")
    m.add_argument("--force", action="store_true", help="replace an earlier make-default output in OUT")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=cmd_make_default)


def cmd_make_default(args) -> int:
    import logging
    import os
    import sys

    from ..default_model import ASSET_DIR
    from ..errors import InputError
    from .make_default import make_default, write_base_model

    if args.base_only:
        if os.path.exists(args.out) and os.listdir(args.out):
            raise InputError(f"{args.out} exists and is not empty")
        write_base_model(args.out, args.seed)
        print(f"wrote the random-weight starting point (seed {args.seed}) to {args.out}")
        return 0
    logging.getLogger("absl").setLevel(logging.ERROR)
    record = make_default(args.out, args.seed, work=args.work, force=args.force, progress=not args.quiet)
    print(f"held-out accuracy {record['accuracy']:.2f} ({record['correct']} of {record['n']}) in "
          f"{record['seconds']:.0f} s; model in {args.out}")
    if args.check:
        with open(os.path.join(args.out, "model.safetensors"), "rb") as a, \
                open(ASSET_DIR / "model.safetensors", "rb") as b:
            same = a.read() == b.read()
        print("identical to the shipped default model" if same else "DIFFERENT from the shipped default model")
        if not same:
            print("llava-jax: the weights differ from the shipped ones", file=sys.stderr)
            return 1
    return 0


def cmd_train(args) -> int:
    import logging
    import sys

    from ..cli import DEFAULT_MODEL_NOTICE
    from .lora import LoraConfig
    from .trainer import TrainConfig, train

    # Orbax logs through absl (a warning per param-tree write); the command reports itself
    logging.getLogger("absl").setLevel(logging.ERROR)
    if args.model is None:
        print(DEFAULT_MODEL_NOTICE, file=sys.stderr)
    config = TrainConfig(stage=args.stage, data=args.data, image_folder=args.image_folder, output=args.output,
                         model=args.model, template=args.template, lr=args.lr, warmup_ratio=args.warmup_ratio,
                         weight_decay=args.weight_decay, epochs=args.epochs, steps=args.steps,
                         batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
                         seed=args.seed, save_every=args.save_every, resume=args.resume, skip_bad=args.skip_bad,
                         truncate=args.truncate, train_vision_tower=args.train_vision_tower,
                         vision_lr=args.vision_lr, remat=args.remat, precision=args.precision,
                         lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         lora_targets=None if args.lora_targets is None else LoraConfig.parse_targets(args.lora_targets),
                         progress=not args.quiet, mesh=args.mesh, fsdp=args.fsdp)
    try:
        result = train(config)
    except KeyboardInterrupt:
        print(f"llava-jax: interrupted; train state saved in {args.output}/checkpoints (--resume continues)",
              file=sys.stderr)
        return 130
    for message in result.skipped:
        print(f"llava-jax: skipped {message}", file=sys.stderr)
    last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    print(f"trained {result.steps} steps ({result.trainable_params:,} of {result.total_params:,} params trainable) "
          f"in {result.seconds:.1f} s ({result.compiled_programs} step programs compiled){last}; model in "
          f"{result.output}")
    return 0
