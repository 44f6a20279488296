"""The training loop: `train(TrainConfig(...))`, what `llava-jax train` runs.

    from llava_jax.train.trainer import TrainConfig, train
    result = train(TrainConfig(stage="pretrain", data="data/pretrain.json", image_folder="data/images",
                               output="stage1", lr=1e-3, steps=100))
    model = llava_jax.load("stage1")   # the trained model, ready for generate / chat / eval

Stage `pretrain` trains the projector (template `plain`), `finetune` the projector and the language model (the
model's conversation template); the vision tower stays frozen unless `train_vision_tower` (own `vision_lr`).
One train step (loss, gradients of the trainable params only, clip, AdamW; see `optim.py`) is one jitted
program per batch shape bucket (`collate.py`).

LoRA (`lora_r`, see `lora.py`): adapters on the language model's linear layers, trained with the projector;
the rest is frozen. The model written at the end has the adapters merged into its weights, and OUT/adapter
holds the adapters (and projector) alone.

Data order: epoch e visits the examples in `numpy.random.default_rng([seed, e]).permutation(n)`, in batches
of `batch_size` (the last one filled with dummy rows), so the micro-step counter is the data position and a
resumed run (`resume=True`: the newest checkpoint in OUT/checkpoints) sees exactly the batches the
uninterrupted run would: its losses are bit for bit the same. Ctrl-C (KeyboardInterrupt) saves the state
before leaving. Every optimizer step appends a JSON line to OUT/metrics.jsonl (step, epoch, loss, lr, grad
norm, tokens/s); at the end the params are written as a model directory in OUT (`checkpoints.write_model`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from ..errors import InputError
from .checkpoints import TrainCheckpoints, write_model
from .collate import Collator, tokenize_examples
from .lora import (
    ADAPTER_DIR,
    LoraConfig,
    add_adapters,
    count_params,
    for_network,
    merge,
    save_adapter,
    trainable_summary,
)
from .lora import trainable_mask as lora_trainable_mask
from .loss import loss_fn
from .optim import STAGES, OptimConfig, current_lr, make_optimizer, merge_params, split_params, trainable_mask

METRICS_FILE = "metrics.jsonl"
DEFAULT_LR = {"pretrain": 1e-3, "finetune": 2e-5}  # the original's scripts
# Settings a resumed run must share with the run it continues (else its data order or schedule differ).
RESUME_KEYS = ("stage", "data", "image_folder", "template", "lr", "warmup_ratio", "weight_decay", "batch_size",
               "grad_accum", "max_length", "seed", "train_vision_tower", "vision_lr", "truncate", "skip_bad",
               "lora_r", "lora_alpha", "lora_dropout", "lora_targets")


@dataclass(frozen=True)
class TrainConfig:
    """A training run; `steps` (optimizer steps) wins over `epochs`. lr None: 1e-3 pretrain, 2e-5 finetune."""

    stage: str
    data: str
    image_folder: str
    output: str
    model: str | None = None  # checkpoint directory; None: the embedded default model
    template: str | None = None  # None: `plain` for pretrain, the model's template for finetune
    lr: float | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 2048
    seed: int = 0
    save_every: int | None = None  # optimizer steps between train-state checkpoints (None: only at the end)
    resume: bool = False
    skip_bad: bool = False
    truncate: bool = False
    train_vision_tower: bool = False
    vision_lr: float | None = None
    lora_r: int | None = None  # LoRA rank; None: no LoRA (see lora.py)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] | str | None = None  # names or "q_proj,v_proj"; None: lora.DEFAULT_TARGETS
    progress: bool = True

    def __post_init__(self):
        if self.stage not in STAGES:
            raise InputError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps must be >= 1, got {self.steps}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise InputError(f"--epochs must be a positive number, got {self.epochs}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup_ratio <= 1:
            raise InputError(f"--warmup-ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.vision_lr is not None and not self.train_vision_tower:
            raise InputError("--vision-lr needs --train-vision-tower")
        if self.lora_r is not None:
            self.lora  # noqa: B018 (checks the LoRA settings)
            if self.stage != "finetune":
                raise InputError("--lora-r needs --stage finetune (LoRA adapts the language model)")

    @property
    def lora(self) -> LoraConfig | None:
        if self.lora_r is None:
            return None
        targets = self.lora_targets
        if isinstance(targets, str):
            targets = LoraConfig.parse_targets(targets)
        targets = {} if targets is None else {"targets": tuple(targets)}
        return LoraConfig(self.lora_r, self.lora_alpha, self.lora_dropout, **targets)

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.stage] if self.lr is None else self.lr


@dataclass
class TrainResult:
    """What a run did: optimizer steps done, their losses, where the model is, compiled step programs."""

    output: str
    steps: int
    losses: list[float] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    compiled_programs: int = 0
    interrupted: bool = False
    trainable_params: int = 0
    total_params: int = 0


def _load_model(path: str | None):
    import llava_jax

    if path is None:
        from ..default_model import default_model_dir

        path = str(default_model_dir())
    return llava_jax.load(path, mesh=None)


class _StepProgram:
    """The jitted train step: loss and gradients of the trainable params, then the optimizer update. Made once per
    (network, optimizer settings, trainable set) in a process (`step_program`), so that runs in one process
    (a resumed run, a notebook) reuse its compiled programs. `key`: the micro-step's dropout key (LoRA)."""

    def __init__(self, network, optim: OptimConfig, lora: LoraConfig | None = None):
        self.tx = None
        self._optim = optim

        def step(trainable, opt_state, frozen, batch, key):
            def loss_of(t):
                params = merge_params(t, frozen)
                return loss_fn(network, params if lora is None else for_network(params, lora, key), batch)

            loss, grads = jax.value_and_grad(loss_of)(trainable)
            updates, opt_state = self.tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, loss, optax.tree.norm(grads)

        self.run = jax.jit(step)
        self.init = jax.jit(lambda trainable: self.tx.init(trainable))

    def bind(self, trainable) -> _StepProgram:
        """Build the optimizer for the trainable tree's structure (once)."""
        if self.tx is None:
            self.tx = make_optimizer(self._optim, trainable)
        return self

    @property
    def compiled(self) -> int:
        """Step programs compiled so far (one per batch shape)."""
        return self.run._cache_size()


@functools.lru_cache(maxsize=8)
def step_program(config, dtype, kernels: str, optim: OptimConfig, stage: str, train_vision_tower: bool,
                 lora: LoraConfig | None = None) -> _StepProgram:
    from ..network import LlavaNetwork

    # stage, train_vision_tower and lora key the cache: they decide the trainable tree the optimizer is built for
    return _StepProgram(LlavaNetwork(config, dtype, kernels), optim, lora)


def train(config: TrainConfig | None = None, *, on_step: Callable[[dict], None] | None = None,
          **kwargs) -> TrainResult:
    """Run a training stage (see the module docstring); `train(stage=..., data=..., ...)` also works.

    on_step(metrics): called after every optimizer step with its metrics dict (a hook for progress, tests, or
    raising KeyboardInterrupt to stop and save)."""
    from .data import load_dataset
    from .labels import stage_template

    cfg = config if config is not None else TrainConfig(**kwargs)
    if config is not None and kwargs:
        cfg = dataclasses.replace(config, **kwargs)
    start = time.monotonic()
    model = _load_model(cfg.model)
    from ..prompt import default_template

    template = stage_template(cfg.stage, cfg.template or default_template(model.config))
    examples, skipped = load_dataset(cfg.data, cfg.image_folder, skip_bad=cfg.skip_bad)
    items, more = tokenize_examples(model, examples, template, cfg.max_length, skip_bad=cfg.skip_bad,
                                    truncate=cfg.truncate, progress=cfg.progress)
    skipped = list(skipped) + more
    per_epoch = math.ceil(len(items) / cfg.batch_size)
    total_micro = (cfg.steps * cfg.grad_accum if cfg.steps is not None
                   else max(cfg.grad_accum, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum) * cfg.grad_accum))
    total_steps = total_micro // cfg.grad_accum
    optim = OptimConfig(lr=cfg.learning_rate, total_steps=total_steps, warmup_ratio=cfg.warmup_ratio,
                        weight_decay=cfg.weight_decay, grad_accum=cfg.grad_accum,
                        vision_lr=cfg.vision_lr if cfg.train_vision_tower else None)
    lora = cfg.lora
    if lora is None:
        params = model.params
        mask = trainable_mask(params, cfg.stage, cfg.train_vision_tower)
    else:
        params = add_adapters(model.params, lora, cfg.seed)
        mask = lora_trainable_mask(params, cfg.train_vision_tower)
    trainable, frozen = split_params(params, mask)
    counts = count_params(trainable), count_params(params)
    if cfg.progress:
        tqdm.write(trainable_summary(*counts))
    program = step_program(model.config, model.dtype, model.kernels, optim, cfg.stage,
                           cfg.train_vision_tower, lora).bind(trainable)
    compiled_before = program.compiled
    state = {"trainable": trainable, "opt_state": program.init(trainable), "key": jax.random.PRNGKey(cfg.seed)}
    settings = {k: getattr(cfg, k) for k in RESUME_KEYS} | {"template": template, "lr": cfg.learning_rate}
    lora_settings = {} if lora is None else {"lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                                             "lora_targets": list(lora.targets)}  # as the JSON record holds them
    settings |= {k: lora_settings.get(k) for k in ("lora_alpha", "lora_dropout", "lora_targets")}

    os.makedirs(cfg.output, exist_ok=True)
    checkpoints = TrainCheckpoints(cfg.output)
    metrics_path = os.path.join(cfg.output, METRICS_FILE)
    micro = 0
    if cfg.resume:
        state, record = checkpoints.restore(state)
        changed = [k for k in RESUME_KEYS if record["settings"].get(k) != settings[k]]
        if changed:
            raise InputError("--resume: these settings differ from the run being resumed: "
                             + ", ".join(f"{k} ({record['settings'].get(k)!r} -> {settings[k]!r})" for k in changed))
        micro = record["micro_step"]
        _truncate_metrics(metrics_path, micro // cfg.grad_accum)
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    collate = Collator.for_examples(model, items, cfg.batch_size, cfg.max_length)
    result = TrainResult(os.path.abspath(cfg.output), micro // cfg.grad_accum, skipped=skipped,
                         trainable_params=counts[0], total_params=counts[1])

    def record_now() -> dict:
        epoch, index = divmod(micro, per_epoch)
        return {"micro_step": micro, "step": micro // cfg.grad_accum, "epoch": epoch, "batch_in_epoch": index,
                "examples": len(items), "settings": settings}

    def save() -> None:
        checkpoints.save(micro, state, record_now())

    bar = tqdm(total=total_steps, initial=micro // cfg.grad_accum, desc=f"train {cfg.stage}", unit="step",
               disable=not cfg.progress)
    window_loss, window_tokens, window_start = [], 0, time.monotonic()
    try:
        with open(metrics_path, "a") as metrics:
            while micro < total_micro:
                epoch, index = divmod(micro, per_epoch)
                order = np.random.default_rng([cfg.seed, epoch]).permutation(len(items))
                batch = collate([items[i] for i in order[index * cfg.batch_size: (index + 1) * cfg.batch_size]])
                trainable, opt_state, loss, grad_norm = program.run(
                    state["trainable"], state["opt_state"], frozen, batch, jax.random.fold_in(state["key"], micro))
                state = {"trainable": trainable, "opt_state": opt_state, "key": state["key"]}
                micro += 1
                window_loss.append(float(loss))
                window_tokens += int(np.asarray(batch.attention_mask).sum())
                if micro % cfg.grad_accum:
                    continue
                step = micro // cfg.grad_accum
                elapsed = time.monotonic() - window_start
                line = {"step": step, "epoch": epoch, "loss": float(np.mean(window_loss)),
                        "lr": current_lr(optim, step - 1), "grad_norm": float(grad_norm),
                        "tokens_per_s": window_tokens / max(elapsed, 1e-9), "seconds": time.monotonic() - start}
                metrics.write(json.dumps(line) + "\n")
                metrics.flush()
                result.losses.append(line["loss"])
                result.steps = step
                bar.update(1)
                bar.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{line['lr']:.2e}",
                                tok_s=f"{line['tokens_per_s']:.0f}")
                window_loss, window_tokens, window_start = [], 0, time.monotonic()
                if cfg.save_every and step % cfg.save_every == 0 and micro < total_micro:
                    save()
                if on_step is not None:
                    on_step(line)
    except KeyboardInterrupt:
        bar.close()
        save()
        result.interrupted = True
        result.seconds = time.monotonic() - start
        result.compiled_programs = program.compiled - compiled_before
        checkpoints.close()
        raise
    bar.close()
    save()
    checkpoints.close()
    params = merge_params(state["trainable"], frozen)
    if lora is not None:
        save_adapter(os.path.join(cfg.output, ADAPTER_DIR), state["trainable"], lora)
        params = merge(params, lora)
    write_model(cfg.output, params, model.config, model.path)
    result.seconds = time.monotonic() - start
    result.compiled_programs = program.compiled - compiled_before
    return result


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines past `step` (written after the checkpoint a run resumes from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(lines)
