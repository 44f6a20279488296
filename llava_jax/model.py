"""`LlavaModel`: the user-facing object returned by `llava_jax.load`, holding config, params and jitted stages."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from .config import LlavaConfig, load_config
from .errors import InputError
from .generate import Decoder, PreparedBatch, pad_batch, scatter_image_features
from .image import AnyResPlan, anyres_plan
from .llama import init_cache
from .llava import Llava, merge_image_features
from .sharding import ShardingPlan, maybe_initialize_distributed, place_params, put, resolve_mesh, to_host
from .validation import check_token_batch  # issue 13

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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

    def __init__(self, config: LlavaConfig, params: dict, dtype="float32", path: str | None = None,
                 mesh=None, fsdp: bool = False):
        """mesh: a `jax.sharding.Mesh` (axes `data`, `model`), "data=2,model=4", "auto" or None (one device);
        params are placed onto their shardings (a no-op for params `load` already placed)."""
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.path = path
        self.module = Llava(config, self.dtype)
        self.mesh = resolve_mesh(mesh, config)
        self.plan = None if self.mesh is None else ShardingPlan.create(self.mesh, config, fsdp)
        self.param_shardings = None
        if self.plan is not None:
            self.param_shardings = self.plan.param_shardings(abstract_params(config, self.dtype))
            params = place_params(params, self.param_shardings)
        self.params = params

    @property
    def batch_multiple(self) -> int:
        """Batches run as a multiple of this many rows (the mesh's data axis); others are padded."""
        return 1 if self.plan is None else self.plan.data_size

    # ---- jitted stages (one compiled program per input shape) ----
    @functools.cached_property
    def _encode_pack(self):
        """Vision tower + projector + packing for one image: one program per crop count (pinpoint)."""

        def run(params, crops, feature_index):
            apply = functools.partial(self.module.apply, {"params": params})
            feats = apply(crops, method=Llava.encode_images)
            return apply(feats.reshape(-1, feats.shape[-1]), feature_index, method=Llava.pack_features)

        if self.plan is None:
            return jax.jit(run)
        # Crops of one image are replicated over the data axis (an image is encoded alone; its crop count
        # rarely divides it); the tower's heads and MLP are split over the model axis. Features come back whole.
        rep = self.plan.replicated
        return jax.jit(run, in_shardings=(self.param_shardings, rep, rep), out_shardings=rep)

    @functools.cached_property
    def _full_forward(self):
        def run(params, input_ids, features, feature_positions, positions, kv_mask):
            apply = functools.partial(self.module.apply, {"params": params})
            embeds = apply(input_ids, method=Llava.embed)
            embeds = merge_image_features(embeds, features, feature_positions)
            cache = init_cache(self.config.text, *input_ids.shape, self.dtype)
            if self.plan is not None:
                cache = jax.lax.with_sharding_constraint(cache, self.plan.cache_shardings())
            hidden, _ = apply(embeds, positions, kv_mask, cache, 0, method=Llava.decode)
            return apply(hidden, method=Llava.logits)

        if self.plan is None:
            return jax.jit(run)
        inp = self.plan.input_sharding
        return jax.jit(run, in_shardings=(self.param_shardings, inp("input_ids"), inp("features"),
                                          inp("feature_positions"), inp("positions"), inp("attention_mask")),
                       out_shardings=self.plan.logits_sharding(self.config.text.vocab_size))

    def _scan_params(self) -> dict:
        """`params` for the vision and full-forward programs (`Decoder.scan_params`: the same views prefill
        uses)."""
        return self.decoder.scan_params(self.params)

    @functools.cached_property
    def decoder(self) -> Decoder:
        """The jitted prefill / decode programs used by `generate`."""
        return Decoder(self.module, self.config, self.plan, self.param_shardings)

    # ---- images ----
    def plan_image(self, height: int, width: int) -> AnyResPlan | None:
        """The AnyRes plan of a LLaVA-NeXT image of this size (None for LLaVA-1.5: always one crop)."""
        if self.config.model_type == "llava":
            return None
        v = self.config.vision
        return anyres_plan(height, width, self.config.image_grid_pinpoints, self.config.semantics,
                           crop_size=v.image_size, patch_size=v.patch_size)

    def encode_image(self, crops: np.ndarray, plan: AnyResPlan | None = None) -> np.ndarray:
        """Features of one preprocessed image, (tokens, hidden) on the host; `plan` None for LLaVA-1.5.

        The packing index is padded to the largest token count of the image's grid, so the compiled program
        depends on the pinpoint only, never on the exact image size.
        """
        if plan is None:
            num_crops, index, padded_len = 1, np.arange(self.config.tokens_per_crop), self.config.tokens_per_crop
        else:
            t = plan.tokens_per_side
            num_crops, index = plan.num_crops, plan.feature_index
            padded_len = plan.tokens_per_crop + plan.rows * t * (plan.cols * t + 1) + 1  # every row/col kept
        padded = np.zeros(padded_len, np.int32)
        padded[: len(index)] = index
        crops = np.asarray(crops[:num_crops], np.float32)
        if self.plan is None:
            crops = jnp.asarray(crops)
        else:
            crops, padded = put(crops, self.plan.replicated), put(padded, self.plan.replicated)
        out = self._encode_pack(self._scan_params(), crops, padded)
        return np.asarray(out[: len(index)])

    def image_features(self, pixel_values, image_sizes=None) -> list[np.ndarray]:
        """Projected (and, for NeXT, packed) features per image: a list of (tokens_i, hidden) host arrays.

        pixel_values: LLaVA-1.5: (images, 3, size, size). LLaVA-NeXT: (images, max_crops, 3, size, size),
        zero-padded past each image's crop count, with `image_sizes` (images, 2) as (height, width).
        """
        pixel_values = np.asarray(pixel_values, np.float32)
        size = self.config.vision.image_size
        if self.config.model_type == "llava":
            if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
                raise InputError(f"pixel_values must be (images, 3, {size}, {size}), got {pixel_values.shape}")
            return [self.encode_image(px[None]) for px in pixel_values]
        if pixel_values.ndim != 5 or pixel_values.shape[2:] != (3, size, size):
            raise InputError(f"pixel_values must be (images, crops, 3, {size}, {size}), got {pixel_values.shape}")
        if image_sizes is None or len(image_sizes) != len(pixel_values):
            raise InputError("LLaVA-NeXT needs image_sizes (images, 2) as (height, width), one per image")
        out = []
        for px, (h, w) in zip(pixel_values, np.asarray(image_sizes).tolist(), strict=True):
            plan = self.plan_image(int(h), int(w))
            if plan.num_crops > px.shape[0]:
                raise InputError(f"an image of {h}x{w} needs {plan.num_crops} crops, pixel_values has {px.shape[0]}")
            out.append(self.encode_image(px, plan))
        return out

    # ---- text and tokenizer ----
    @functools.cached_property
    def tokenizer(self):
        """The checkpoint's tokenizer (transformers AutoTokenizer, loaded from the model directory)."""
        from .prompt import load_tokenizer

        if self.path is None:
            raise InputError("this model was built in memory and has no tokenizer directory")
        return load_tokenizer(self.path)

    @functools.cached_property
    def processor(self):
        """Images + text -> HF-processor-compatible arrays (`LlavaProcessor`)."""
        from .processor import LlavaProcessor

        return LlavaProcessor(self.config, self.tokenizer)

    def generate(self, prompts, images=None, **kwargs):
        """Answer one prompt (str -> str) or a batch (list -> list), each with zero, one or several images.

        prompts: the user's question(s). They are wrapped in the conversation template (`template=`, default
        from the checkpoint; "raw" uses the text as is) with `<image>` markers prepended where the text has
        none. images: for one prompt, None, an image, or a list of images; for a batch, one such entry per
        prompt. Images are PIL images, numpy arrays or file paths.
        Keywords: max_new_tokens (128), temperature (0 = greedy), top_p, top_k, seed, stop (strings),
        stop_token_ids, template, system, return_ids (also return the new token ids), stream (callback
        `stream(row, text_delta)` called as text is produced).
        """
        from .textgen import generate

        return generate(self, prompts, images, **kwargs)

    def generate_ids(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, **kwargs):
        """Token-level generation from HF-style inputs (the arrays `forward` takes); no tokenizer needed.

        Rows are left-padded prompts (attention_mask 0 on padding) with image tokens already expanded; images
        are taken in order, row by row. Keywords: max_new_tokens, temperature, top_p, top_k, seed,
        stop_token_ids (default: the config's EOS). Returns each row's new token ids, through its stop token.
        """
        from .textgen import generate_ids

        return generate_ids(self, input_ids, pixel_values, image_sizes, attention_mask, **kwargs)

    def chat(self, template: str | None = None, system: str | None = None, **generate_kwargs):
        """A multi-turn `ChatSession`: `session.ask(text, images=None)` returns each answer."""
        from .textgen import ChatSession

        return ChatSession(self, template=template, system=system, **generate_kwargs)

    # ---- HF-compatible forward ----
    def forward(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None):
        """Logits (batch, seq, vocab) as float32 numpy, for the same inputs as HF's model forward.

        input_ids already hold the image token repeated once per image feature (as HF's processor makes
        them); attention_mask marks real tokens (left padding = 0). position_ids default to 0..seq-1, as in
        HF's forward (HF's `generate` instead uses cumsum(attention_mask) - 1).
        """
        input_ids, attention_mask = check_token_batch(input_ids, attention_mask, self.config)  # issue 13
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise InputError(f"input_ids must be (batch, seq), got shape {ids.shape}")
        mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape) if position_ids is None else position_ids
        feats = [] if pixel_values is None else self.image_features(pixel_values, image_sizes)
        features, feature_positions = scatter_image_features(ids, feats, self.config.image_token_id,
                                                             self.config.text.hidden_size, self.dtype)
        if self.plan is None:
            logits = self._full_forward(
                self._scan_params(), jnp.asarray(ids, jnp.int32), features, feature_positions,
                jnp.asarray(positions, jnp.int32), jnp.asarray(mask),
            )
            return np.asarray(logits)
        # sharded: pad the batch to a multiple of the data axis with dummy rows, dropped from the result
        rows = len(ids)
        batch = pad_batch(PreparedBatch(ids.astype(np.int32), mask, np.asarray(positions, np.int32), features,
                                        feature_positions, np.zeros(rows, int)), self.plan.data_size)
        inp = self.plan.input_sharding
        logits = self._full_forward(self.params, *(put(getattr(batch, n), inp(n)) for n in (
            "input_ids", "features", "feature_positions", "positions", "attention_mask")))
        return to_host(logits)[:rows]


def _adopt_host_arrays(tree: dict) -> dict:
    """Host arrays -> device arrays in place, one leaf at a time, each host array dropped as soon as it is
    placed: on CPU `device_put` adopts a 64-byte aligned numpy buffer without copying, elsewhere at most one
    tensor exists twice. (`tree_map(jnp.asarray, ...)` would hold two copies of every weight at its peak.)"""
    for key, value in tree.items():
        tree[key] = _adopt_host_arrays(value) if isinstance(value, dict) else jax.device_put(value)
    return tree


def load(path: str, dtype="float32", mesh="auto", fsdp: bool = False,
         verify: bool | None = None) -> LlavaModel:  # issue 13: verify
    """Load a LLaVA checkpoint directory: llava-hf or original safetensors, or a llava-jax converted one.

    dtype: "float32", "bfloat16" or "float16": the dtype params are stored and computed in.
    mesh: where params, KV cache and batches live: a `jax.sharding.Mesh` with axes `data` (batch) and `model`
    (heads, MLP, vocabulary), a string "data=2,model=4" (one size may be -1: the rest), "auto" (the default: all
    devices, the model axis as wide as the heads allow within a host; a single device means no mesh) or None
    (the default device only). fsdp: also shard the embedding dimension of weight matrices over `data`.
    Each parameter is placed onto its sharding as it is loaded: no device ever holds a whole sharded tensor.
    verify: check the files against the checksums written with the checkpoint (converted checkpoints and the
    default model; `integrity`); None (default): on unless LLAVA_JAX_VERIFY=0. False skips the hashing.
    """
    maybe_initialize_distributed()
    from . import checkpoint
    from .safetensors_io import CheckpointError
    from .weights import load_safetensors_params

    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint directory")
    config = load_config(path)
    dt = resolve_dtype(dtype)
    abstract = abstract_params(config, dt)
    mesh = resolve_mesh(mesh, config)
    # Target shardings (None: one device): a converted checkpoint is restored straight into them by Orbax (each
    # host reads only its shards); safetensors tensors are device_put onto them one by one.
    shardings = None if mesh is None else ShardingPlan.create(mesh, config, fsdp).param_shardings(abstract)
    if checkpoint.is_converted(path):  # written by llava-jax-convert: one Orbax restore onto the shardings
        params = checkpoint.restore_params(path, abstract, shardings, verify=verify)  # issue 13: verify
        return LlavaModel(config, params, dt, path=path, mesh=mesh, fsdp=fsdp)
    sources = checkpoint.open_source(path, verify=verify).sources  # original LLaVA-1.5: plus its CLIP checkpoint
    params = load_safetensors_params(sources, config, abstract, dt)
    if shardings is None:
        params = _adopt_host_arrays(params)
    else:
        params = place_params(params, shardings)
    return LlavaModel(config, params, dt, path=path, mesh=mesh, fsdp=fsdp)
