"""Device meshes and shardings: one rule table from parameter paths to logical axes to mesh axes.

Two mesh axes: `data` (the batch: data parallelism) and `model` (heads, MLP and vocabulary: tensor parallelism).
Every array the model touches gets logical axis names, in two steps, both tables in this file:

1. `PARAM_AXES`: a regex on the parameter path ("language_model/layers/q_proj/weight") -> one logical name per
   dimension. Activations, the KV cache and the decode state are named in `STATE_AXES` and `INPUT_AXES`.
2. `AXIS_RULES`: logical name -> mesh axis (or None: replicated). `FSDP_RULES` is laid over it with
   `fsdp=True`: the `embed` dimension of every weight matrix is then sharded over `data` too, so that a model
   that does not fit the model axis alone is spread over every device (gathered layer by layer when used).

A dimension whose size (or whose count of heads: q, kv and vision heads are never split) does not divide its
mesh axis is replicated instead, with a debug-level log line naming the tensor: GQA models with 8 kv heads on a
model axis of 16, say, replicate their k/v projections and their cache while q, o and the MLP stay sharded.
Correctness never depends on the table (XLA's partitioner inserts whatever communication a layout needs); the
table decides memory per device and communication volume.

Multi-host: `maybe_initialize_distributed()` calls `jax.distributed.initialize()` when a cluster environment is
present (see docs/multihost.md); every process then runs the same program on the same inputs, and `put`
builds global arrays from the host values every process holds.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .errors import InputError

log = logging.getLogger(__name__)

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)

# ---- the rule table ------------------------------------------------------------------------------------------
# Step 1: parameter path -> logical axis per dimension (first match wins; every parameter must match one).
# Stacked (nn.scan) layers have a leading `layers` dimension. `vector` marks 1-D norm scales and biases along an
# embedding dimension: tiny, always replicated.
PARAM_AXES: list[tuple[str, tuple[str, ...]]] = [
    # decoder
    (r"language_model/embed_tokens/embedding", ("vocab", "embed")),
    (r"language_model/layers/q_proj/weight", ("layers", "heads", "embed")),
    (r"language_model/layers/[kv]_proj/weight", ("layers", "kv_heads", "embed")),
    (r"language_model/layers/o_proj/weight", ("layers", "embed", "heads")),
    (r"language_model/layers/(gate|up)_proj/weight", ("layers", "mlp", "embed")),
    (r"language_model/layers/down_proj/weight", ("layers", "embed", "mlp")),
    (r"language_model/layers/\w+_layernorm/scale", ("layers", "vector")),
    (r"language_model/norm/scale", ("vector",)),
    (r"language_model/lm_head/weight", ("vocab", "embed")),
    # CLIP vision tower
    (r"vision_tower/patch_embedding/weight", ("vision_embed", "patch")),
    (r"vision_tower/(class_embedding|pre_layrnorm/\w+)", ("vector",)),
    (r"vision_tower/position_embedding", ("positions", "vision_embed")),
    (r"vision_tower/layers/[qkv]_proj/weight", ("layers", "vision_heads", "vision_embed")),
    (r"vision_tower/layers/[qkv]_proj/bias", ("layers", "vision_heads")),
    (r"vision_tower/layers/out_proj/weight", ("layers", "vision_embed", "vision_heads")),
    (r"vision_tower/layers/fc1/weight", ("layers", "vision_mlp", "vision_embed")),
    (r"vision_tower/layers/fc1/bias", ("layers", "vision_mlp")),
    (r"vision_tower/layers/fc2/weight", ("layers", "vision_embed", "vision_mlp")),
    (r"vision_tower/layers/(out_proj|fc2|layer_norm[12])/\w+", ("layers", "vector")),
    # projector: linear_1 column-parallel, the following ones row-parallel (Megatron-style pairs)
    (r"multi_modal_projector/linear_1/weight", ("proj_mlp", "vision_embed")),
    (r"multi_modal_projector/linear_1/bias", ("proj_mlp",)),
    (r"multi_modal_projector/linear_\d+/weight", ("embed", "proj_mlp")),
    (r"multi_modal_projector/linear_\d+/bias", ("vector",)),
    (r"image_newline", ("vector",)),
]
_PARAM_AXES = [(re.compile(pattern + "$"), axes) for pattern, axes in PARAM_AXES]

# The KV cache (layout fixed by llama.py), the decode state (engine.DecodeState) and batch inputs. `tokens` and
# `done` are replicated: tiny, and every host reads them after each decode chunk (multi-host included).
STATE_AXES: dict[str, tuple[str | None, ...]] = {
    "cache": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "kv_mask": ("batch", "length"),
    "tokens": (None, None),
    "done": (None,),
    "step": (),
    "position": ("batch",),
    "write_index": (),
    "key": (None,),
}
INPUT_AXES: dict[str, tuple[str | None, ...]] = {
    "input_ids": ("batch", "length"),
    "attention_mask": ("batch", "length"),
    "positions": ("batch", "length"),
    "embeds": ("batch", "length", "embed_act"),
    "logits": ("batch", "length", "vocab"),
}

# Step 2: logical axis -> mesh axis. Names absent here (layers, length, head_dim, patch, positions, vector,
# embed_act) are replicated.
AXIS_RULES: dict[str, str | None] = {
    "batch": DATA,
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "vocab": MODEL,
    "vision_heads": MODEL,
    "vision_mlp": MODEL,
    "proj_mlp": MODEL,
    "embed": None,
    "vision_embed": None,
}
FSDP_RULES: dict[str, str | None] = {"embed": DATA, "vision_embed": DATA}


_logged: set = set()


def _debug_once(msg: str, *args) -> None:
    if args not in _logged:
        _logged.add(args)
        log.debug(msg, *args)


def head_units(config) -> dict[str, int]:
    """Logical axes made of heads: a head is never split across devices, so these counts must divide the axis."""
    return {"heads": config.text.num_heads, "kv_heads": config.text.num_kv_heads,
            "vision_heads": config.vision.num_heads}


def logical_axes(path: str, ndim: int | None = None) -> tuple[str, ...]:
    """The logical axes of the parameter at `path` ("a/b/c"); ValueError if no rule covers it."""
    head, _, leaf = path.rpartition("/")
    if leaf in ("lora_a", "lora_b"):  # LoRA factors: the input (a) or output (b) axes of the weight they adapt
        layers, fan_out, fan_in = logical_axes(head + "/weight")
        axes = (layers, fan_in, "lora_rank") if leaf == "lora_a" else (layers, "lora_rank", fan_out)
        if ndim is not None and len(axes) != ndim:
            raise ValueError(f"sharding rule for {path} names {len(axes)} axes, the parameter has {ndim}")
        return axes
    for pattern, axes in _PARAM_AXES:
        if pattern.match(path):
            if ndim is not None and len(axes) != ndim:
                raise ValueError(f"sharding rule for {path} names {len(axes)} axes, the parameter has {ndim}")
            return axes
    raise ValueError(f"no sharding rule covers parameter {path}: add one to PARAM_AXES in llava_jax/sharding.py")


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


# ---- meshes --------------------------------------------------------------------------------------------------
class MeshError(InputError):
    """A mesh description that cannot be built on these devices."""


def parse_mesh(spec: str) -> dict[str, int]:
    """"data=2,model=4" -> {"data": 2, "model": 4}. One axis may be -1 (the remaining devices); an axis left out
    is -1 when the other is given ("model=4" on 8 devices is data=2, model=4)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in AXES:
            raise MeshError(f"bad mesh {spec!r}: expected comma-separated axis=size with axes {', '.join(AXES)} "
                            "(e.g. data=2,model=4)")
        if name in out:
            raise MeshError(f"bad mesh {spec!r}: axis {name} given twice")
        try:
            size = int(value)
        except ValueError:
            raise MeshError(f"bad mesh {spec!r}: size of {name} must be an integer, got {value.strip()!r}") from None
        if size == 0 or size < -1:
            raise MeshError(f"bad mesh {spec!r}: size of {name} must be positive (or -1 for the rest)")
        out[name] = size
    if not out:
        raise MeshError(f"bad mesh {spec!r}: no axes given")
    return out


def _complete(shape: dict[str, int], num_devices: int) -> dict[str, int]:
    shape = dict(shape)
    if len(shape) == 1:
        (given,) = shape
        shape[DATA if given == MODEL else MODEL] = -1
    text = ",".join(f"{k}={v}" for k, v in shape.items())
    unknown = [k for k, v in shape.items() if v == -1]
    if len(unknown) > 1:
        raise MeshError(f"mesh {text}: at most one axis may be -1")
    known = math.prod(v for v in shape.values() if v != -1)
    if unknown:
        if num_devices % known:
            raise MeshError(f"mesh {text}: {known} does not divide the {num_devices} available device(s)")
        shape[unknown[0]] = num_devices // known
    if math.prod(shape.values()) > num_devices:
        raise MeshError(f"mesh {text} needs {math.prod(shape.values())} devices, {num_devices} are available")
    return {a: shape[a] for a in AXES}


def default_mesh_shape(num_devices: int, local_devices: int | None = None, config=None) -> dict[str, int]:
    """All devices: the model axis as wide as the heads allow within one host (tensor parallelism needs the
    fast intra-host links), the data axis across hosts and over what is left."""
    local = local_devices or num_devices
    model = 1
    for d in range(1, local + 1):
        if local % d or num_devices % d:
            continue
        if config is not None and (config.text.num_heads % d or config.text.num_kv_heads % d):
            continue
        model = d
    return {DATA: num_devices // model, MODEL: model}


def make_mesh(shape: dict[str, int] | str | None = None, config=None, devices=None) -> Mesh:
    """A (data, model) mesh with Auto axes (XLA propagates shardings), from a dict, a "data=2,model=4" string or
    None (the default shape over every device, see `default_mesh_shape`)."""
    local = jax.local_device_count() if devices is None else None
    devices = list(devices) if devices is not None else jax.devices()
    if shape is None:
        shape = default_mesh_shape(len(devices), local, config)
    elif isinstance(shape, str):
        shape = parse_mesh(shape)
    shape = _complete(shape, len(devices))
    sizes = tuple(shape[a] for a in AXES)
    if math.prod(sizes) < len(devices):
        log.info("mesh %s uses %d of %d devices", shape, math.prod(sizes), len(devices))
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def resolve_mesh(mesh, config=None) -> Mesh | None:
    """`load`'s mesh argument -> a Mesh or None (single device, no sharding).

    None / "none": no mesh. "auto": the default mesh when there is more than one device, else None. A string
    "data=2,model=4" or a dict: that mesh. A `jax.sharding.Mesh`: used as is (Explicit axes made Auto).
    """
    if mesh is None:
        return None
    if isinstance(mesh, Mesh):
        if any(t != AxisType.Auto for t in getattr(mesh, "axis_types", ())):
            mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
        return mesh
    if isinstance(mesh, str):
        key = mesh.strip().lower()
        if key in ("none", "off", "single", ""):
            return None
        if key == "auto":
            return make_mesh(None, config) if jax.device_count() > 1 else None
    return make_mesh(mesh, config)


# ---- shardings -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardingRules:
    """Shardings of every array of one model on one mesh (from the rule table)."""

    mesh: Mesh
    units: dict[str, int] = field(default_factory=dict)  # logical axis -> head count (see head_units)
    fsdp: bool = False

    @classmethod
    def create(cls, mesh: Mesh, config, fsdp: bool = False) -> ShardingRules:
        return cls(mesh, head_units(config), fsdp)

    @property
    def rules(self) -> dict[str, str | None]:
        return {**AXIS_RULES, **(FSDP_RULES if self.fsdp else {})}

    def axis_size(self, axis: str | None) -> int:
        return 1 if axis is None else dict(self.mesh.shape).get(axis, 1)

    @property
    def data_size(self) -> int:
        return self.axis_size(DATA)

    def spec(self, logical, shape=None, name: str = "") -> P:
        """PartitionSpec for logical axes; a dimension that does not divide its mesh axis is replicated."""
        rules, used, out = self.rules, set(), []
        for i, ax in enumerate(logical):
            mesh_axis = rules.get(ax) if ax is not None else None
            if mesh_axis is None or mesh_axis not in self.mesh.shape or mesh_axis in used:
                out.append(None)
                continue
            size = self.axis_size(mesh_axis)
            if size == 1:  # nothing to split: say "replicated" rather than name a trivial axis
                out.append(None)
                continue
            bad = []
            if shape is not None and shape[i] % size:
                bad.append(f"size {shape[i]}")
            if ax in self.units and self.units[ax] % size:
                bad.append(f"{self.units[ax]} {ax}")
            if bad:
                _debug_once("sharding: replicating %s dimension %d (%s: %s) instead of splitting it over %s=%d",
                            name or "array", i, ax, ", ".join(bad), mesh_axis, size)
                out.append(None)
                continue
            used.add(mesh_axis)
            out.append(mesh_axis)
        return P(*out)

    def sharding(self, logical, shape=None, name: str = "") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape, name))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def param_shardings(self, params) -> dict:
        """A tree of NamedShardings shaped like `params` (arrays or `jax.ShapeDtypeStruct`s)."""

        def one(path, leaf):
            name = path_str(path)
            return self.sharding(logical_axes(name, len(leaf.shape)), leaf.shape, name)

        return jax.tree_util.tree_map_with_path(one, params)

    def input_sharding(self, name: str) -> NamedSharding:
        """The sharding of a batch array named in `INPUT_AXES`."""
        return self.sharding(INPUT_AXES[name], name=name)


# ---- placing arrays ------------------------------------------------------------------------------------------
def put(x, sharding: NamedSharding):
    """A host value (the same on every process) or an array -> a global array with `sharding`.

    Each device receives only its own slice, so a sharded parameter never exists whole on one device.
    """
    if isinstance(x, jax.Array) or sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def place_params(params: dict, shardings: dict) -> dict:
    """device_put every parameter onto its sharding, one at a time."""
    return jax.tree_util.tree_map(put, params, shardings)


def to_host(x) -> np.ndarray:
    """A global array as numpy on this host (gathered from the other processes when it spans several)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def device_bytes(tree) -> dict:
    """Bytes held per device by the arrays of `tree` (device -> bytes)."""
    out: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


# ---- multi-host ----------------------------------------------------------------------------------------------
def distributed_env() -> str | None:
    """The cluster environment that asks for `jax.distributed.initialize()`, or None (a single process).

    LLAVA_JAX_DISTRIBUTED=1 forces it (jax's own auto-detection then fills in the parameters), =0 disables it.
    Otherwise: JAX_COORDINATOR_ADDRESS (explicit set-up, with JAX_NUM_PROCESSES and JAX_PROCESS_ID), SLURM
    or Open MPI with more than one task, or a multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES lists several).
    """
    env = os.environ
    forced = env.get("LLAVA_JAX_DISTRIBUTED", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return None
    if forced in ("1", "true", "yes", "on"):
        return "forced"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env and "SLURM_JOB_ID" in env:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "openmpi"
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "tpu"
    return None


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` once when `distributed_env()` finds a cluster; True if initialized.

    Must run before anything touches the devices; `llava_jax.load` and the CLI call it first thing.
    """
    if jax.distributed.is_initialized():
        return True
    kind = distributed_env()
    if kind is None:
        return False
    kwargs = {}
    if kind == "explicit":
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
        if "JAX_NUM_PROCESSES" in os.environ:
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in os.environ:
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:  # the backend was already initialized by earlier JAX use in this process
        log.warning("jax.distributed.initialize() failed (%s): running as a single process. Call "
                    "llava_jax.sharding.maybe_initialize_distributed() before any other JAX call.", e)
        return False
    log.info("jax.distributed initialized (%s): process %d of %d, %d local / %d global devices", kind,
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
