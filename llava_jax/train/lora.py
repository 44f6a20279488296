"""LoRA: low-rank adapters on the language model's linear layers, as the original LLaVA trains them with peft.

Each targeted map W (q, k, v, o, gate, up, down of every decoder layer: the original's `find_all_linear_names`,
which leaves out the vision tower, the projector and lm_head) gets two trainable matrices, stored next to its
weight in the param tree, stacked over layers like it:

    language_model/layers/q_proj/{weight (L, out, in), lora_a (L, in, r), lora_b (L, r, out)}

and computes W x + (alpha / r) * B A dropout(x). `lora_a` is peft's `lora_A.weight` transposed, initialized as
peft does (kaiming-uniform with a = sqrt(5): uniform in +-1/sqrt(in)); `lora_b` is `lora_B.weight` transposed,
zeros, so a fresh adapter changes nothing. The projector (and `image_newline`) train fully, as in the
original's LoRA scripts; everything else is frozen (`trainable_mask`), so only adapters and projector get
gradients and optimizer state.

How the network sees them (`for_network`): a params transform turns each (lora_a, lora_b) into a `lora` entry
{"a", "b": (alpha / r) * lora_b, "dropout": {"key", "rate"} while training}, which the decoder layer adds to
its projections as an explicit low-rank term (`linear.add_low_rank`). Explicit rather than merged into W on
the fly: dropout acts on the adapter's input only, which a merged W cannot express, and the frozen W then
needs no gradient (a merged W would get a full-size weight gradient per layer, as in full fine-tuning).
`merge` folds the adapters into the weights (W + (alpha / r) B A) for a plain model: the trained model a run
writes, and `llava-jax export`.

Saved adapters (`save_adapter` / `load_adapter`): a directory with `adapter.safetensors` (every trainable
param: the adapters and the projector, which the original also saves next to them as non-LoRA trainables) and
`adapter_config.json` (r, alpha, dropout, targets).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import CheckpointError, InputError

# the original's find_all_linear_names on a Llama/Mistral LLaVA (lm_head removed, as it does)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_LEAVES = ("lora_a", "lora_b")
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"  # where a LoRA run saves its adapters, inside its output directory


@dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r), dropout on the adapters' input, targeted maps.
    Defaults of alpha and dropout: the original's train.py (16, 0.05)."""

    r: int
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int | np.integer) or self.r < 1:
            raise InputError(f"--lora-r must be an integer >= 1, got {self.r!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise InputError(f"--lora-alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in DEFAULT_TARGETS]
        if unknown or not targets or len(set(targets)) != len(targets):
            what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "empty or repeated"
            raise InputError(f"--lora-targets: {what}; choose from {','.join(DEFAULT_TARGETS)}")
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @classmethod
    def parse_targets(cls, text: str) -> tuple[str, ...]:
        """"q_proj,v_proj" -> ("q_proj", "v_proj") (checked when the config is made)."""
        return tuple(t.strip() for t in text.split(",") if t.strip())


def _layers(params) -> dict:
    return params["language_model"]["layers"]


def _with_layers(params, layers: dict) -> dict:
    return {**params, "language_model": {**params["language_model"], "layers": layers}}


def _adapter_shapes(params, cfg: LoraConfig) -> dict:
    """{target: {"lora_a": (L, in, r), "lora_b": (L, r, out)} as ShapeDtypeStructs in the weight's dtype}."""
    out = {}
    for name in cfg.targets:
        weight = _layers(params)[name]["weight"]
        count, fan_out, fan_in = weight.shape
        out[name] = {"lora_a": jax.ShapeDtypeStruct((count, fan_in, cfg.r), weight.dtype),
                     "lora_b": jax.ShapeDtypeStruct((count, cfg.r, fan_out), weight.dtype)}
    return out


def add_adapters(params, cfg: LoraConfig, seed: int = 0) -> dict:
    """`params` with fresh adapters on the targeted maps: lora_a uniform in +-1/sqrt(in) (peft's kaiming-uniform
    init with a = sqrt(5)), lora_b zeros; in the weights' dtype. Drawn on the host with numpy (jax's threefry
    would compile a program per shape, seconds each on a CPU)."""
    rng = np.random.default_rng(seed)
    layers = dict(_layers(params))
    for name, shapes in _adapter_shapes(params, cfg).items():
        a, b = shapes["lora_a"], shapes["lora_b"]
        bound = 1.0 / math.sqrt(a.shape[1])
        layers[name] = {**layers[name],
                        "lora_a": jnp.asarray(rng.uniform(-bound, bound, a.shape).astype(np.float32), a.dtype),
                        "lora_b": jnp.asarray(np.zeros(b.shape, np.float32), b.dtype)}
    return _with_layers(params, layers)


def _is_adapter(path) -> bool:
    return str(getattr(path[-1], "key", path[-1])) in ADAPTER_LEAVES


def trainable_mask(params, train_vision_tower: bool = False):
    """True on what a LoRA run trains: the adapters, the projector and `image_newline` (and the vision tower
    with `train_vision_tower`); the language model's own weights stay frozen."""

    def trains(path, _):
        top = str(getattr(path[0], "key", path[0]))
        if top == "language_model":
            return _is_adapter(path)
        if top == "vision_tower":
            return train_vision_tower
        return True

    return jax.tree_util.tree_map_with_path(trains, params)


def for_network(params, cfg: LoraConfig, dropout_key=None) -> dict:
    """The params as the network reads them: each (lora_a, lora_b) pair replaced by a `lora` entry {"a",
    "b": scale * lora_b} (see the module docstring); with `dropout_key` (training) and dropout > 0, also
    {"dropout": {"key", "rate"}}, one key per map and layer. Differentiable in params."""
    layers = dict(_layers(params))
    names = [n for n in DEFAULT_TARGETS if "lora_a" in layers.get(n, {})]
    for i, name in enumerate(names):
        entry = dict(layers[name])
        a, b = entry.pop("lora_a"), entry.pop("lora_b")
        lora = {"a": a, "b": b * jnp.asarray(cfg.scale, b.dtype)}
        if dropout_key is not None and cfg.dropout > 0:
            count = a.shape[0]
            lora["dropout"] = {"key": jax.random.split(jax.random.fold_in(dropout_key, i), count),
                               "rate": jnp.full((count,), cfg.dropout, jnp.float32)}
        layers[name] = {**entry, "lora": lora}
    return _with_layers(params, layers)


def merge(params, cfg: LoraConfig) -> dict:
    """A plain param tree: every adapter folded into its weight, W + (alpha / r) (lora_a @ lora_b).T (computed in
    fp32, rounded once to the weight's dtype), the lora leaves removed."""
    layers = dict(_layers(params))
    adapted = {name: entry for name, entry in layers.items() if isinstance(entry, dict) and "lora_a" in entry}
    for name, weight in _merged_weights(adapted, cfg.scale).items():
        layers[name] = {k: v for k, v in layers[name].items() if k not in ADAPTER_LEAVES} | {"weight": weight}
    return _with_layers(params, layers)


@jax.jit
def _merged_weights(adapted: dict, scale):
    """{name: weight + scale * (lora_a @ lora_b).T} for {name: {weight, lora_a, lora_b}} (one program for all)."""
    out = {}
    for name, entry in adapted.items():
        a, b, weight = (jnp.asarray(entry[k], jnp.float32) for k in ("lora_a", "lora_b", "weight"))
        delta = jnp.einsum("lir,lro->loi", a, b, precision=jax.lax.Precision.HIGHEST)
        out[name] = (weight + scale * delta).astype(entry["weight"].dtype)
    return out


def count_params(tree) -> int:
    """Number of scalars in a param tree (None leaves, the frozen part of a split tree, count nothing)."""
    return sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree))


def trainable_summary(trainable: int, total: int) -> str:
    """peft's `print_trainable_parameters` line."""
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


# ---------------------------------------------------------------- saving and loading


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def save_adapter(directory: str, trainable, cfg: LoraConfig) -> str:
    """Write the trainable params of a LoRA run (the tree `split_params` gives: adapters and projector, None
    elsewhere) and `cfg` into `directory`. Returns its absolute path."""
    from ..export import write_safetensors

    os.makedirs(directory, exist_ok=True)
    tensors = _flat(trainable)
    if not any(name.rsplit("/", 1)[-1] in ADAPTER_LEAVES for name in tensors):
        raise InputError("save_adapter: the tree holds no LoRA adapters")
    write_safetensors(os.path.join(directory, ADAPTER_FILE), tensors, metadata={"format": "llava-jax-lora"})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(asdict(cfg) | {"targets": list(cfg.targets)}, f, indent=2)
        f.write("\n")
    return os.path.abspath(directory)


def read_adapter_config(directory: str) -> LoraConfig:
    from ..jsonfile import read_json

    raw = read_json(os.path.join(directory, ADAPTER_CONFIG), CheckpointError, "adapter config")
    try:
        return LoraConfig(r=raw["r"], alpha=raw["alpha"], dropout=raw["dropout"], targets=tuple(raw["targets"]))
    except (KeyError, TypeError, InputError) as e:
        raise CheckpointError(f"{directory}/{ADAPTER_CONFIG}: not a LoRA adapter config ({e})") from None


def load_adapter(directory: str, params) -> tuple[dict, LoraConfig]:
    """(params with the saved adapters added and the saved projector in place, the adapter's config): the
    model `save_adapter` saved, on the base `params` it was trained from. `merge(*...)` gives plain params."""
    from ..safetensors_io import read_header

    cfg = read_adapter_config(directory)
    path = os.path.join(directory, ADAPTER_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no {ADAPTER_FILE} (not a saved LoRA adapter)")
    saved = {ref.name: ref for ref in read_header(path)}
    layers = dict(_layers(params))
    for name, shapes in _adapter_shapes(params, cfg).items():  # placeholders, each replaced by a saved tensor
        layers[name] = {**layers[name], **shapes}
    tree = _with_layers(params, layers)
    # the shapes the saved tensors must have (the vision tower: saved by a --train-vision-tower run)
    expected = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
                for path, leaf in jax.tree_util.tree_leaves_with_path(trainable_split(tree, train_vision_tower=True))}
    missing = sorted(set(n for n in expected if n.startswith("language_model/")) - set(saved))
    unknown = sorted(set(saved) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"{path} does not fit this model: missing {missing[:3]}, unexpected {unknown[:3]}")
    for name, ref in saved.items():
        if tuple(ref.shape) != expected[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(ref.shape)}, the model needs "
                                  f"{expected[name].shape} (another base model?)")

    def replace(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return jnp.asarray(saved[name].read(), leaf.dtype) if name in saved else leaf

    return jax.tree_util.tree_map_with_path(replace, tree), cfg


def trainable_split(params, train_vision_tower: bool = False):
    """The trainable part of a LoRA param tree (None elsewhere)."""
    from .optim import split_params

    return split_params(params, trainable_mask(params, train_vision_tower))[0]


def apply_adapter(model, directory: str):
    """A `LlavaModel` like `model` with the adapter saved in `directory` merged into its weights."""
    from ..model import LlavaModel

    params, cfg = load_adapter(directory, model.params)
    return LlavaModel(model.config, merge(params, cfg), model.dtype, path=model.path, kernels=model.kernels)
