"""`LlavaModel`: the user-facing object returned by `llava_jax.load`, holding config, params and jitted stages."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from .config import LlavaConfig, load_config
from .llama import init_cache
from .llava import Llava, merge_image_features

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class InputError(ValueError):
    """Inputs that do not fit the model: image/token count mismatches, bad shapes, prompts too long."""


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def _init_inputs(config: LlavaConfig, dtype):
    size = config.vision.image_size
    seq = 4
    return dict(
        input_ids=jnp.zeros((1, seq), jnp.int32),
        pixel_values=jnp.zeros((1, 3, size, size), jnp.float32),
        feature_index=jnp.zeros((seq,), jnp.int32),
        positions=jnp.zeros((1, seq), jnp.int32),
        kv_mask=jnp.ones((1, seq), bool),
        cache=init_cache(config.text, 1, seq, dtype),
    )


def init_params(config: LlavaConfig, dtype="float32", seed: int = 0) -> dict:
    """Randomly initialized parameters (Flax default initializers) with the tree `load` produces."""
    dt = resolve_dtype(dtype)
    module = Llava(config, dt)
    # jitted: op-by-op init of the scanned layers takes seconds even for toy models
    init = jax.jit(lambda key: module.init(key, **_init_inputs(config, dt))["params"])
    return init(jax.random.PRNGKey(seed))


def abstract_params(config: LlavaConfig, dtype="float32") -> dict:
    """The param tree as `jax.ShapeDtypeStruct`s, computed without allocating anything."""
    dt = resolve_dtype(dtype)
    module = Llava(config, dt)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **_init_inputs(config, dt)))
    return shapes["params"]


class LlavaModel:
    """A loaded LLaVA model: `config`, `params` (a nested dict of arrays) and HF-compatible `forward`."""

    def __init__(self, config: LlavaConfig, params: dict, dtype="float32", path: str | None = None):
        self.config = config
        self.params = params
        self.dtype = resolve_dtype(dtype)
        self.path = path
        self.module = Llava(config, self.dtype)

    # ---- jitted stages (one compiled program per input shape) ----
    @functools.cached_property
    def _encode_images(self):
        return jax.jit(lambda p, px: self.module.apply({"params": p}, px, method=Llava.encode_images))

    @functools.cached_property
    def _pack_features(self):
        return jax.jit(lambda p, f, i: self.module.apply({"params": p}, f, i, method=Llava.pack_features))

    @functools.cached_property
    def _full_forward(self):
        def run(params, input_ids, features, flat_positions, positions, kv_mask):
            apply = functools.partial(self.module.apply, {"params": params})
            embeds = apply(input_ids, method=Llava.embed)
            embeds = merge_image_features(embeds, features, flat_positions)
            cache = init_cache(self.config.text, *input_ids.shape, self.dtype)
            hidden, _ = apply(embeds, positions, kv_mask, cache, 0, method=Llava.decode)
            return apply(hidden, method=Llava.logits)

        return jax.jit(run)

    # ---- images ----
    def image_features(self, pixel_values, image_sizes=None) -> list[jax.Array]:
        """Projected (and, for NeXT, packed) features per image: a list of (tokens_i, hidden) arrays.

        pixel_values: LLaVA-1.5: (images, 3, size, size). LLaVA-NeXT: (images, max_crops, 3, size, size),
        zero-padded past each image's crop count, with `image_sizes` (images, 2) as (height, width).
        """
        pixel_values = np.asarray(pixel_values, np.float32)
        size = self.config.vision.image_size
        if self.config.model_type == "llava":
            if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
                raise InputError(f"pixel_values must be (images, 3, {size}, {size}), got {pixel_values.shape}")
            feats = self._encode_images(self.params, pixel_values)
            return list(feats)
        from .image import anyres_plan

        if pixel_values.ndim != 5 or pixel_values.shape[2:] != (3, size, size):
            raise InputError(f"pixel_values must be (images, crops, 3, {size}, {size}), got {pixel_values.shape}")
        if image_sizes is None or len(image_sizes) != len(pixel_values):
            raise InputError("LLaVA-NeXT needs image_sizes (images, 2) as (height, width), one per image")
        out = []
        for px, (h, w) in zip(pixel_values, np.asarray(image_sizes).tolist(), strict=True):
            plan = anyres_plan(int(h), int(w), self.config.image_grid_pinpoints, self.config.semantics,
                               crop_size=size, patch_size=self.config.vision.patch_size)
            if plan.num_crops > px.shape[0]:
                raise InputError(f"image of size {h}x{w} needs {plan.num_crops} crops, pixel_values has {px.shape[0]}")
            feats = self._encode_images(self.params, px[: plan.num_crops])
            flat = feats.reshape(-1, feats.shape[-1])
            out.append(self._pack_features(self.params, flat, jnp.asarray(plan.feature_index, jnp.int32)))
        return out

    # ---- HF-compatible forward ----
    def forward(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None):
        """Logits (batch, seq, vocab) as float32 numpy, for the same inputs as HF's model forward.

        input_ids already hold the image token repeated once per image feature (as HF's processor makes
        them); attention_mask marks real tokens (left padding = 0). position_ids default to 0..seq-1, as in
        HF's forward (HF's `generate` instead uses cumsum(attention_mask) - 1).
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise InputError(f"input_ids must be (batch, seq), got shape {ids.shape}")
        batch, seq = ids.shape
        mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        positions = np.broadcast_to(np.arange(seq), ids.shape) if position_ids is None else np.asarray(position_ids)
        image_positions = np.flatnonzero(ids == self.config.image_token_id)
        hidden = self.config.text.hidden_size
        if pixel_values is not None:
            feats = self.image_features(pixel_values, image_sizes)
            features = jnp.concatenate(feats, axis=0) if feats else jnp.zeros((0, hidden), self.dtype)
        else:
            features = jnp.zeros((0, hidden), self.dtype)
        if features.shape[0] != image_positions.size:
            raise InputError(
                f"image features and image tokens do not match: input_ids hold {image_positions.size} image "
                f"tokens (id {self.config.image_token_id}), the images give {features.shape[0]} features"
            )
        logits = self._full_forward(
            self.params, jnp.asarray(ids, jnp.int32), features, jnp.asarray(image_positions, jnp.int32),
            jnp.asarray(positions, jnp.int32), jnp.asarray(mask),
        )
        return np.asarray(logits)


def load(path: str, dtype="float32") -> LlavaModel:
    """Load a LLaVA checkpoint directory: llava-hf or original safetensors, or a llava-jax converted one.

    dtype: "float32", "bfloat16" or "float16": the dtype params are stored and computed in.
    """
    from .safetensors_io import CheckpointError
    from .weights import load_safetensors_params

    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint directory")
    config = load_config(path)
    dt = resolve_dtype(dtype)
    sources = [(path, config.layout)]
    params = load_safetensors_params(sources, config, abstract_params(config, dt), dt)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return LlavaModel(config, params, dt, path=path)
