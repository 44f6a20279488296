"""The training loss: next-token cross-entropy, mean over the supervised tokens of the batch, as HF's
`LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration` compute it from `labels` (shift by one,
ignore -100, mean over what is left).

Only the positions that predict a supervised token go through `lm_head`: the host turns `labels` into the flat
(batch * seq) indices of those positions and their target ids, padded to a bucket with weight 0 (`LossBatch`).
The loss is the same number as HF's; the (tokens, vocab) logits of every unsupervised position (an image's
hundreds of feature positions, the prompt) are never computed.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ..batch import PromptBatch, make_batch, prompt_bucket
from ..errors import InputError
from .labels import IGNORE_INDEX


@flax.struct.dataclass
class LossBatch:
    """The device inputs of one loss evaluation (numpy or jax arrays; every shape comes from buckets)."""

    input_ids: jax.Array  # (batch, seq) int32
    attention_mask: jax.Array  # (batch, seq) bool
    positions: jax.Array  # (batch, seq) int32
    crops: jax.Array  # (crops, 3, size, size) float32; (0, 3, 1, 1) for a batch without images
    feature_index: jax.Array  # (features,) int32, see network.py
    feature_positions: jax.Array  # (features,) int32
    target_positions: jax.Array  # (targets,) int32: flat index of the position that predicts each target
    target_ids: jax.Array  # (targets,) int32
    target_weight: jax.Array  # (targets,) float32: 1 for a real target, 0 for padding

    @property
    def num_tokens(self) -> int:
        """Real (attended) tokens of the batch."""
        return int(np.asarray(self.attention_mask).sum())


def shifted_targets(labels: np.ndarray, bucket: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels (batch, seq) -> (flat positions, target ids, weights): position b*seq + t predicts labels[b, t+1]
    wherever that label is not IGNORE_INDEX. Padded with weight 0 to `bucket` entries (default: a
    `prompt_bucket` of the count, minimum 8), so that the loss program's shape changes rarely."""
    labels = np.asarray(labels)
    rows, seq = labels.shape
    nxt = labels[:, 1:]
    b, t = np.nonzero(nxt != IGNORE_INDEX)
    count = len(b)
    size = bucket if bucket is not None else prompt_bucket(count, minimum=8)
    if count > size:
        raise InputError(f"{count} supervised tokens do not fit a target bucket of {size}")
    positions = np.zeros(size, np.int32)
    ids = np.zeros(size, np.int32)
    weight = np.zeros(size, np.float32)
    positions[:count] = b * seq + t
    ids[:count] = nxt[b, t]
    weight[:count] = 1.0
    return positions, ids, weight


def loss_batch(batch: PromptBatch, labels, tokens_per_crop: int, target_bucket: int | None = None) -> LossBatch:
    """A `PromptBatch` (from `make_batch`) and its labels (batch, seq) -> `LossBatch`."""
    labels = np.asarray(labels)
    if labels.shape != batch.input_ids[: batch.rows].shape:
        raise InputError(f"labels shape {labels.shape} != input_ids shape {batch.input_ids[: batch.rows].shape}")
    if len(batch.input_ids) > batch.rows:  # dummy rows carry no labels
        pad = np.full((len(batch.input_ids) - batch.rows, labels.shape[1]), IGNORE_INDEX, labels.dtype)
        labels = np.concatenate([labels, pad])
    crops, index, where = batch.stacked_images(tokens_per_crop)
    positions, ids, weight = shifted_targets(labels, target_bucket)
    return LossBatch(batch.input_ids, batch.attention_mask, batch.positions, crops, index, where,
                     positions, ids, weight)


def target_logits(network, batch: LossBatch):
    """fp32 logits (targets, vocab) at the positions that predict a target (a method for `network.apply`)."""
    embeds = network.embed(batch.input_ids)
    if batch.crops.shape[0]:  # a batch without images skips the vision tower
        embeds = network.insert_images(embeds, batch.crops, batch.feature_index, batch.feature_positions)
    hidden, _ = network.language_model(embeds, batch.positions, batch.attention_mask)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return network.logits(jnp.take(flat, batch.target_positions, axis=0))


def cross_entropy(logits, target_ids, weight):
    """Weighted mean of -log softmax(logits)[target] (the mean over real targets when weights are 0/1)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, target_ids[:, None], axis=-1)[:, 0]
    return -jnp.sum(picked * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def loss_fn(network, params, batch: LossBatch):
    """The mean next-token cross-entropy of `batch` under `params` (differentiable in params)."""
    logits = network.apply({"params": params}, batch, method=target_logits)
    return cross_entropy(logits, batch.target_ids, batch.target_weight)


def hf_inputs_batch(model, input_ids, labels, pixel_values=None, image_sizes=None, attention_mask=None) -> LossBatch:
    """HF-style inputs (as `LlavaModel.forward` takes them, plus `labels`) -> `LossBatch`.

    input_ids hold the image token once per image feature; positions are 0..seq-1 as in HF's forward."""
    from ..validation import check_token_batch

    ids, mask = check_token_batch(input_ids, attention_mask, model.config)
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    images = [] if pixel_values is None else model.image_crops(pixel_values, image_sizes)
    batch = make_batch(ids, mask, images, model.config.image_token_id, 1, positions)
    return loss_batch(batch, labels, model.config.tokens_per_crop)
