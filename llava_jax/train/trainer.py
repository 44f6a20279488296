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

`mesh` / `fsdp`: the train state and the batches on a (data, model) mesh, by the inference sharding rule table,
each process collating only its share of every batch (`sharded.py`).
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
from ..remat import check_remat
from ..sharding import to_host
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
from .precision import Precision
from .sharded import ShardedFeed, TrainSharding, scalar

METRICS_FILE = "metrics.jsonl"
DEFAULT_LR = {"pretrain": 1e-3, "finetune": 2e-5}  # the original's scripts
# Settings a resumed run must share with the run it continues (else its data order or schedule differ, or, for
# param_layout, its saved weights would be read transposed: the state is saved as a flat list of arrays).
RESUME_KEYS = ("stage", "data", "image_folder", "template", "lr", "warmup_ratio", "weight_decay", "batch_size",
               "grad_accum", "max_length", "seed", "train_vision_tower", "vision_lr", "truncate", "skip_bad",
               "precision", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "param_layout")
PARAM_LAYOUT = "weight (out, in)"  # how Linear params are stored (`linear.Linear`)
# settings added later: what a checkpoint written before them ran with
RESUME_DEFAULTS = {"precision": "fp32", "param_layout": "kernel (in, out)"}


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
    remat: str = "none"  # per-layer rematerialization: none, dots, full (`llava_jax.remat`)
    precision: str = "fp32"  # fp32, mixed, bf16 (`precision.py`)
    lora_r: int | None = None  # LoRA rank; None: no LoRA (see lora.py)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] | str | None = None  # names or "q_proj,v_proj"; None: lora.DEFAULT_TARGETS
    progress: bool = True
    mesh: str | None = None  # a (data, model) mesh ("data=2,model=4", "auto"; see `sharded.py`); None: one device
    fsdp: bool = False  # with a mesh: also split params and optimizer state over `data` (sharding.FSDP_RULES)

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
        if self.fsdp and self.mesh is None:
            raise InputError("--fsdp needs --mesh")
        check_remat(self.remat)
        Precision(self.precision)
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
    bytes_per_device: int = 0  # the most any device holds of params + optimizer state (at the end)
    param_specs: dict = field(default_factory=dict)  # on a mesh: param path -> PartitionSpec (as a tuple)
    trainable_params: int = 0
    total_params: int = 0


def _load_model(path: str | None, mesh: str | None = None, fsdp: bool = False, dtype: str = "float32"):
    import llava_jax

    if path is None:
        from ..default_model import default_model_dir

        path = str(default_model_dir())
    return llava_jax.load(path, dtype=dtype, mesh=mesh, fsdp=fsdp)  # params placed by the rule table on a mesh


class _StepProgram:
    """The jitted train step: loss and gradients of the trainable params, then the optimizer update. Made once per
    (network, optimizer settings, trainable set) in a process (`step_program`), so that runs in one process
    (a resumed run, a notebook) reuse its compiled programs. On a mesh (`placement`) the step has explicit
    shardings and donates the train state (`sharded.TrainSharding.step_jit`). `key`: the micro-step's dropout
    key (LoRA)."""

    def __init__(self, network, optim: OptimConfig, precision: Precision, placement: TrainSharding | None = None,
                 lora: LoraConfig | None = None):
        self.tx = None
        self._optim = optim
        self.placement = placement

        def step(trainable, opt_state, frozen, batch, key):
            def loss_of(t):
                params = merge_params(t, frozen)
                params = params if lora is None else for_network(params, lora, key)
                return loss_fn(network, precision.compute_params(params), batch)

            loss, grads = jax.value_and_grad(loss_of)(trainable)
            if placement is not None:  # gradients laid out like their params (with FSDP: reduce-scattered)
                grads = jax.lax.with_sharding_constraint(grads, placement.params(trainable))
            updates, opt_state = self.tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, loss, optax.tree.norm(grads)

        self._step = step
        self.run = jax.jit(step)
        self.init = jax.jit(lambda trainable: self.tx.init(trainable))

    def bind(self, trainable, frozen=None) -> _StepProgram:
        """Build the optimizer for the trainable tree's structure (once); on a mesh also the step's shardings,
        for which it needs the `frozen` tree too."""
        if self.tx is None:
            self.tx = make_optimizer(self._optim, trainable)
            if self.placement is not None:
                init = self.tx.init
                self.init = self.placement.init_jit(init, trainable)
                self.run = self.placement.step_jit(self._step, trainable, jax.eval_shape(init, trainable), frozen)
        return self

    @property
    def compiled(self) -> int:
        """Step programs compiled so far (one per batch shape)."""
        return self.run._cache_size()


@functools.lru_cache(maxsize=8)
def step_program(config, dtype, kernels: str, optim: OptimConfig, stage: str, train_vision_tower: bool,
                 remat: str = "none", precision: str = "fp32", mesh=None, fsdp: bool = False,
                 lora: LoraConfig | None = None) -> _StepProgram:
    """The step program of a network and optimizer; `dtype` is the loaded params' (the network computes in the
    precision's compute dtype, which is `dtype` except under "mixed")."""
    from ..network import LlavaNetwork
    from ..sharding import ShardingRules

    # stage, train_vision_tower and lora key the cache: they decide the trainable tree the optimizer is built for
    placement = None if mesh is None else TrainSharding(ShardingRules.create(mesh, config, fsdp))
    prec = Precision(precision)
    compute = dtype if precision == "fp32" else prec.compute_dtype
    return _StepProgram(LlavaNetwork(config, compute, kernels, remat=remat), optim, prec, placement, lora)


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
    model = _load_model(cfg.model, cfg.mesh, cfg.fsdp, Precision(cfg.precision).load_dtype)
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
    if cfg.progress and jax.process_index() == 0:
        tqdm.write(trainable_summary(*counts))
    program = step_program(model.config, model.dtype, model.kernels, optim, cfg.stage, cfg.train_vision_tower,
                           cfg.remat, cfg.precision, model.mesh, cfg.fsdp, lora).bind(trainable, frozen)
    placement = program.placement
    if placement is not None:
        placement.check_batch_size(cfg.batch_size)
    compiled_before = program.compiled
    key = jax.random.PRNGKey(cfg.seed)
    state = {"trainable": trainable, "opt_state": program.init(trainable),
             "key": key if placement is None else jax.device_put(key, placement.replicated)}
    main_process = jax.process_index() == 0  # multi-host: one process writes metrics and the model
    settings = {k: getattr(cfg, k) for k in RESUME_KEYS if k != "param_layout"} | {
        "template": template, "lr": cfg.learning_rate, "param_layout": PARAM_LAYOUT}
    lora_settings = {} if lora is None else {"lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                                             "lora_targets": list(lora.targets)}  # as the JSON record holds them
    settings |= {k: lora_settings.get(k) for k in ("lora_alpha", "lora_dropout", "lora_targets")}

    os.makedirs(cfg.output, exist_ok=True)
    checkpoints = TrainCheckpoints(cfg.output)
    metrics_path = os.path.join(cfg.output, METRICS_FILE)
    micro = 0
    if cfg.resume:
        state, record = checkpoints.restore(state)
        saved = {k: record["settings"].get(k, RESUME_DEFAULTS.get(k)) for k in RESUME_KEYS}
        changed = [k for k in RESUME_KEYS if saved[k] != settings[k]]
        if changed:
            raise InputError("--resume: these settings differ from the run being resumed: "
                             + ", ".join(f"{k} ({saved[k]!r} -> {settings[k]!r})" for k in changed))
        micro = record["micro_step"]
        _truncate_metrics(metrics_path, micro // cfg.grad_accum)
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    if placement is None:
        collate = Collator.for_examples(model, items, cfg.batch_size, cfg.max_length)
    else:  # each process collates only its share of every batch
        collate = ShardedFeed(placement, lambda rows: Collator.for_examples(model, items, rows, cfg.max_length),
                              cfg.batch_size, model.config.tokens_per_crop)
    result = TrainResult(os.path.abspath(cfg.output), micro // cfg.grad_accum, skipped=skipped,
                         trainable_params=counts[0], total_params=counts[1])

    def record_now() -> dict:
        epoch, index = divmod(micro, per_epoch)
        return {"micro_step": micro, "step": micro // cfg.grad_accum, "epoch": epoch, "batch_in_epoch": index,
                "examples": len(items), "settings": settings}

    def save() -> None:
        if checkpoints.latest_step() != micro:  # Ctrl-C right after a --save-every save: already saved
            checkpoints.save(micro, state, record_now())

    bar = tqdm(total=total_steps, initial=micro // cfg.grad_accum, desc=f"train {cfg.stage}", unit="step",
               disable=not cfg.progress)
    window_loss, window_tokens, window_start = [], 0, time.monotonic()
    try:
        with open(metrics_path, "a") as metrics:
            while micro < total_micro:
                epoch, index = divmod(micro, per_epoch)
                order = np.random.default_rng([cfg.seed, epoch]).permutation(len(items))
                rows = [items[i] for i in order[index * cfg.batch_size: (index + 1) * cfg.batch_size]]
                batch = collate(rows)
                trainable, opt_state, loss, grad_norm = program.run(
                    state["trainable"], state["opt_state"], frozen, batch, jax.random.fold_in(state["key"], micro))
                state = {"trainable": trainable, "opt_state": opt_state, "key": state["key"]}
                micro += 1
                window_loss.append(scalar(loss))
                window_tokens += sum(min(it.length, cfg.max_length) for it in rows)
                if micro % cfg.grad_accum:
                    continue
                step = micro // cfg.grad_accum
                elapsed = time.monotonic() - window_start
                line = {"step": step, "epoch": epoch, "loss": float(np.mean(window_loss)),
                        "lr": current_lr(optim, step - 1), "grad_norm": scalar(grad_norm),
                        "tokens_per_s": window_tokens / max(elapsed, 1e-9), "seconds": time.monotonic() - start}
                if main_process:
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
    trained = jax.tree_util.tree_map(to_host, state["trainable"])  # gathered (a collective: every process)
    params = merge_params(trained, jax.tree_util.tree_map(to_host, frozen))
    if lora is not None:
        params = merge(params, lora)
    if main_process:
        if lora is not None:
            save_adapter(os.path.join(cfg.output, ADAPTER_DIR), trained, lora)
        write_model(cfg.output, params, model.config, model.path)
    result.seconds = time.monotonic() - start
    result.compiled_programs = program.compiled - compiled_before
    _describe_placement(result, state, frozen)
    return result


def _describe_placement(result: TrainResult, state: dict, frozen) -> None:
    from ..sharding import device_bytes, path_str

    params = merge_params(state["trainable"], frozen)
    result.bytes_per_device = max(device_bytes([params, state["opt_state"]]).values())
    result.param_specs = {path_str(p): tuple(x.sharding.spec) for p, x in jax.tree_util.tree_leaves_with_path(params)
                          if isinstance(x.sharding, jax.sharding.NamedSharding)}


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines past `step` (written after the checkpoint a run resumes from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(lines)
