"""`LlavaModel`: the user-facing object `llava_jax.load` returns: config, params, the network and its engine."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from .batch import ImageCrops, make_batch
from .config import LlavaConfig, load_config
from .dtypes import resolve_dtype
from .engine import GenerationEngine
from .errors import InputError
from .image import AnyResPlan, anyres_plan
from .kernels import resolve_kernels
from .network import LlavaNetwork
from .sharding import ShardingRules, maybe_initialize_distributed, place_params, resolve_mesh
from .validation import check_token_batch


def _init_inputs(config: LlavaConfig) -> tuple:
    """The smallest inputs that reach every parameter (one image feature at position 0)."""
    size, seq = config.vision.image_size, 4
    return (jnp.zeros((1, seq), jnp.int32), jnp.ones((1, seq), bool), jnp.arange(seq)[None],
            jnp.zeros((1, 3, size, size), jnp.float32), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))


def init_params(config: LlavaConfig, dtype="float32", seed: int = 0) -> dict:
    """Randomly initialized parameters (Flax default initializers) with the tree `load` produces."""
    network = LlavaNetwork(config, resolve_dtype(dtype), "reference")
    return jax.jit(lambda key: network.init(key, *_init_inputs(config))["params"])(jax.random.PRNGKey(seed))


def abstract_params(config: LlavaConfig, dtype="float32") -> dict:
    """The param tree as `jax.ShapeDtypeStruct`s, computed without allocating anything."""
    network = LlavaNetwork(config, resolve_dtype(dtype), "reference")
    return jax.eval_shape(lambda: network.init(jax.random.PRNGKey(0), *_init_inputs(config)))["params"]


class LlavaModel:
    """A loaded LLaVA model: `config`, `params` (a nested dict of arrays), the `network` (a Flax module) and
    the compiled `engine`; HF-compatible `forward`, and `generate`, `generate_ids` and `chat`."""

    def __init__(self, config: LlavaConfig, params: dict, dtype="float32", path: str | None = None,
                 mesh=None, fsdp: bool = False, kernels: str | None = None):
        """mesh: a `jax.sharding.Mesh` (axes `data`, `model`), "data=2,model=4", "auto" or None (one device);
        params are placed onto their shardings (a no-op for params `load` already placed). kernels: the
        backend kernel set ("auto" or None: the default backend's; see `llava_jax.kernels`)."""
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.path = path
        self.kernels = resolve_kernels(kernels)
        self.network = LlavaNetwork(config, self.dtype, self.kernels)
        self.mesh = resolve_mesh(mesh, config)
        self.sharding_rules = None if self.mesh is None else ShardingRules.create(self.mesh, config, fsdp)
        self.param_shardings = None
        if self.sharding_rules is not None:
            self.param_shardings = self.sharding_rules.param_shardings(abstract_params(config, self.dtype))
            params = place_params(params, self.param_shardings)
        self.params = params

    @functools.cached_property
    def engine(self) -> GenerationEngine:
        """The compiled programs (embed, insert_images, logits, prefill, decode) for this model's devices."""
        return GenerationEngine(self.network, self.sharding_rules, self.param_shardings)

    @property
    def batch_multiple(self) -> int:
        """Batches run as a multiple of this many rows (the mesh's data axis); others are padded."""
        return self.engine.data_size

    # ---- images ----
    def plan_image(self, height: int, width: int) -> AnyResPlan | None:
        """The AnyRes plan of a LLaVA-NeXT image of this size (None for LLaVA-1.5: always one crop)."""
        if self.config.model_type == "llava":
            return None
        v = self.config.vision
        return anyres_plan(height, width, self.config.image_grid_pinpoints, self.config.semantics,
                           crop_size=v.image_size, patch_size=v.patch_size,
                           merge=self.config.patch_merge_type)

    def image_crops(self, pixel_values, image_sizes=None) -> list[ImageCrops]:
        """HF-style pixel arrays -> one `ImageCrops` per image.

        pixel_values: LLaVA-1.5: (images, 3, size, size). LLaVA-NeXT: (images, max_crops, 3, size, size),
        zero-padded past each image's crop count, with `image_sizes` (images, 2) as (height, width).
        """
        pixel_values = np.asarray(pixel_values, np.float32)
        size = self.config.vision.image_size
        if self.config.model_type == "llava":
            if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
                raise InputError(f"pixel_values must be (images, 3, {size}, {size}), got {pixel_values.shape}")
            return [ImageCrops.create(self.config, px[None], None) for px in pixel_values]
        if pixel_values.ndim != 5 or pixel_values.shape[2:] != (3, size, size):
            raise InputError(f"pixel_values must be (images, crops, 3, {size}, {size}), got {pixel_values.shape}")
        if image_sizes is None or len(image_sizes) != len(pixel_values):
            raise InputError("LLaVA-NeXT needs image_sizes (images, 2) as (height, width), one per image")
        return [ImageCrops.create(self.config, px, self.plan_image(int(h), int(w)))
                for px, (h, w) in zip(pixel_values, np.asarray(image_sizes).tolist(), strict=True)]

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
        ids, mask = check_token_batch(input_ids, attention_mask, self.config)
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape) if position_ids is None else position_ids
        images = [] if pixel_values is None else self.image_crops(pixel_values, image_sizes)
        batch = make_batch(ids, mask, images, self.config.image_token_id, self.batch_multiple, positions)
        return self.engine.forward_logits(self.params, batch)

    # ---- training ----
    @functools.cached_property
    def _loss_programs(self):
        from .train.loss import loss_fn

        # a training network: the kernels' differentiable set (some inference tricks carry no gradient)
        fn = functools.partial(loss_fn, LlavaNetwork(self.config, self.dtype, self.kernels, remat="none"))
        return jax.jit(fn), jax.jit(jax.value_and_grad(fn))

    def loss(self, input_ids, labels, pixel_values=None, image_sizes=None, attention_mask=None) -> float:
        """The mean next-token cross-entropy over the tokens whose label is not -100, as HF's model computes
        it from `labels` (same inputs as `forward`, labels (batch, seq) aligned with input_ids)."""
        from .train.loss import hf_inputs_batch

        batch = hf_inputs_batch(self, input_ids, labels, pixel_values, image_sizes, attention_mask)
        return float(self._loss_programs[0](self.params, batch))

    def loss_and_grad(self, input_ids, labels, pixel_values=None, image_sizes=None, attention_mask=None):
        """(loss, grads): `loss` and its gradient with respect to every param, a tree shaped like `params`."""
        from .train.loss import hf_inputs_batch

        batch = hf_inputs_batch(self, input_ids, labels, pixel_values, image_sizes, attention_mask)
        loss, grads = self._loss_programs[1](self.params, batch)
        return float(loss), grads


def load(path: str, dtype="float32", mesh="auto", fsdp: bool = False, kernels: str | None = None,
         verify: bool | None = None) -> LlavaModel:
    """Load a LLaVA checkpoint directory: llava-hf or original safetensors, or a llava-jax converted one.

    dtype: "float32", "bfloat16" or "float16": the dtype params are stored and computed in.
    mesh: where params, KV cache and batches live: a `jax.sharding.Mesh` with axes `data` (batch) and `model`
    (heads, MLP, vocabulary), a string "data=2,model=4" (one size may be -1: the rest), "auto" (the default: all
    devices, the model axis as wide as the heads allow within a host; a single device means no mesh) or None
    (the default device only). fsdp: also shard the embedding dimension of weight matrices over `data`.
    Each parameter is placed onto its sharding as it is loaded: no device ever holds a whole sharded tensor.
    kernels: the backend kernel set, "auto" (default: from the backend), "reference", "xla_cpu", "gpu" or "tpu".
    verify: check the files against the checksums written with the checkpoint (converted checkpoints and the
    default model; `integrity`); None (default): on unless LLAVA_JAX_VERIFY=0. False skips the hashing.
    """
    maybe_initialize_distributed()
    from . import checkpoint
    from .direct_read import adopt_host_arrays
    from .integrity import checksum_error
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
    shardings = None if mesh is None else ShardingRules.create(mesh, config, fsdp).param_shardings(abstract)
    if checkpoint.is_converted(path):  # written by llava-jax-convert: one Orbax restore onto the shardings
        params = checkpoint.restore_params(path, abstract, shardings, verify=verify)
        return LlavaModel(config, params, dt, path=path, mesh=mesh, fsdp=fsdp, kernels=kernels)
    # the tensors' checksums (when the directory has a manifest) are computed from the bytes read for loading
    source = checkpoint.open_source(path, verify=verify, defer_tensor_hashes=True)
    bad: list = []
    params = load_safetensors_params(source.sources, config, abstract, dt, source.digests,  # original LLaVA-1.5:
                                     lambda *failed: bad.append(failed))  # sources are it and its CLIP checkpoint
    if bad:
        raise checksum_error(path, bad, source.remedy)
    if shardings is None:
        params = adopt_host_arrays(params)
    else:
        params = place_params(params, shardings)
    return LlavaModel(config, params, dt, path=path, mesh=mesh, fsdp=fsdp, kernels=kernels)
