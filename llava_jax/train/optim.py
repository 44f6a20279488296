"""The optimizer of the original LLaVA training (HF Trainer defaults as its scripts set them), in optax.

- AdamW (betas 0.9 / 0.999, eps 1e-8), weight decay on every param but biases and norm scales (HF Trainer's
  rule: no decay for biases and LayerNorm weights);
- learning rate: linear warmup from 0 over ceil(warmup_ratio * steps) optimizer steps, then cosine to 0
  (`transformers.get_cosine_schedule_with_warmup`);
- gradients clipped to a global norm of 1.0 (`max_grad_norm`), after accumulation;
- gradient accumulation: `optax.MultiSteps` averages `grad_accum` micro-batch gradients (each the mean over its
  own tokens, as the original's Trainer did) before one update.

Which params train is a partition of the param tree (`trainable_mask`): frozen leaves are removed from the tree
the optimizer sees (replaced by None), so they get no gradient, no moments and no accumulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

STAGES = ("pretrain", "finetune")


@dataclass(frozen=True)
class OptimConfig:
    """Hyper-parameters; the defaults are the original's (stage 1: lr 1e-3, stage 2: 2e-5, no decay)."""

    lr: float = 2e-5
    total_steps: int = 1  # optimizer steps (after accumulation): the schedule's length
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    vision_lr: float | None = None  # the vision tower's own lr, when it trains
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def warmup_cosine(lr: float, total_steps: int, warmup_ratio: float):
    """lr at optimizer step s (0-based): lr * s / w for s < w, then lr * (1 + cos(pi * (s - w) / (T - w))) / 2,
    w = ceil(warmup_ratio * T) (HF's get_cosine_schedule_with_warmup with its warmup-steps rounding)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    decay = max(1, total_steps - warmup)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = step / max(1, warmup)
        progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
        return lr * jnp.where(step < warmup, warm, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))

    return schedule


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def decay_mask(tree):
    """True where weight decay applies: every leaf but biases and norm scales."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) not in ("bias", "scale"), tree)


def trainable_mask(params, stage: str, train_vision_tower: bool = False):
    """True on the params a stage trains: `pretrain` the projector (and `image_newline`, which belongs to it in
    the original: it is created with the projector and trained with `tune_mm_mlp_adapter`), `finetune` the
    projector and the language model; the vision tower only with `train_vision_tower`."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")

    def trains(path, _):
        top = str(getattr(path[0], "key", path[0]))
        if top == "vision_tower":
            return train_vision_tower
        if top == "language_model":
            return stage == "finetune"
        return True  # multi_modal_projector, image_newline

    return jax.tree_util.tree_map_with_path(trains, params)


def split_params(params, mask):
    """(trainable, frozen): two trees shaped like params, each with None where the other holds the leaf."""
    trainable = jax.tree_util.tree_map(lambda x, m: x if m else None, params, mask)
    frozen = jax.tree_util.tree_map(lambda x, m: None if m else x, params, mask)
    return trainable, frozen


def merge_params(trainable, frozen):
    """The inverse of `split_params`."""
    return jax.tree_util.tree_map(lambda t, f: f if t is None else t, trainable, frozen,
                                  is_leaf=lambda x: x is None)


def _group_labels(trainable):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "vision" if str(getattr(p[0], "key", p[0])) == "vision_tower" else "main", trainable)


def make_optimizer(cfg: OptimConfig, trainable) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW (per group lr schedule) over `trainable` (the tree `split_params` gives),
    wrapped in `optax.MultiSteps` when `grad_accum` > 1."""

    def adamw(lr):
        return optax.adamw(warmup_cosine(lr, cfg.total_steps, cfg.warmup_ratio), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask)

    groups = {"main": adamw(cfg.lr), "vision": adamw(cfg.vision_lr if cfg.vision_lr is not None else cfg.lr)}
    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.multi_transform(groups, _group_labels(trainable)))
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx


def current_lr(cfg: OptimConfig, optimizer_step: int) -> float:
    """The main group's lr at an optimizer step (for progress and metrics)."""
    return float(warmup_cosine(cfg.lr, cfg.total_steps, cfg.warmup_ratio)(optimizer_step))
