"""`llava-jax bench --train-memory`: the train step's memory per setting (rematerialization x precision, and
gradient accumulation), from the compiled step program's `memory_analysis()`: argument, output and temporary
bytes as XLA assigned them for this backend. Nothing is allocated: the program is lowered from the shapes of
the params, the optimizer state and a batch (`jax.ShapeDtypeStruct`s), so a shape too big for the machine can
be measured too.

The model is a benchmark shape's language model cut to a few decoder layers (`--shape`, default 7b: its real
layer width) under a tiny vision tower, trained as stage `finetune` on text-only rows. Two derived numbers:
- state bytes per trainable param: trainable params + optimizer state (+ the accumulator under grad-accum),
  counted from the trees; what the params and the optimizer hold between steps;
- activation bytes per token per decoder layer: what the backward pass keeps from the forward pass for one
  token in one layer, from the residuals of `jax.vjp` of the loss (shapes only; `activation_bytes_per_token_
  per_layer`). XLA's temp bytes are no measure of this at a small token count: their peak is reached in the
  optimizer update (param-sized buffers), not at the end of the forward pass.
"""

from __future__ import annotations

import dataclasses

from .checkpoints import checkpoint_config
from .measure import log

REMATS = ("none", "dots", "full")
PRECISIONS = ("fp32", "mixed", "bf16")


def layer_cut_config(shape: str, layers: int):
    """The `LlavaConfig` of benchmark shape `shape` with `layers` decoder layers and the tests' tiny vision tower."""
    from ..config import config_from_dict
    from ..default_model import small_config

    d = checkpoint_config(shape, "float32")
    d["text_config"]["num_hidden_layers"] = layers
    tiny = small_config()
    d["vision_config"] = tiny["vision_config"]
    d["image_grid_pinpoints"] = tiny["image_grid_pinpoints"]
    return config_from_dict(d, f"bench-{shape}-{layers}-layers")


def _abstract_batch(rows: int, seq: int):
    """A text-only `LossBatch` of shapes only, every next token supervised."""
    import jax
    import jax.numpy as jnp

    from ..train.loss import LossBatch

    def s(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype)

    targets = rows * seq
    return LossBatch(s((rows, seq), jnp.int32), s((rows, seq), jnp.bool_), s((rows, seq), jnp.int32),
                     s((0, 3, 1, 1), jnp.float32), s((0,), jnp.int32), s((0,), jnp.int32),
                     s((targets,), jnp.int32), s((targets,), jnp.int32), s((targets,), jnp.float32))


def _tree_bytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def _tree_size(tree) -> int:
    import jax

    return sum(x.size for x in jax.tree_util.tree_leaves(tree))


def step_memory(config, remat: str, precision: str, grad_accum: int, rows: int, seq: int,
                kernels: str | None = None) -> dict:
    """Compile the stage-`finetune` train step of `config` for a micro-batch of `rows` x `seq` tokens and return
    its memory: XLA's argument / output / temp bytes, and the state bytes counted from the trees."""
    import jax

    from ..kernels import resolve_kernels
    from ..model import abstract_params
    from ..train.optim import OptimConfig, split_params, trainable_mask
    from ..train.precision import Precision
    from ..train.trainer import step_program

    prec = Precision(precision)
    params = abstract_params(config, prec.load_dtype)
    trainable, frozen = split_params(params, trainable_mask(params, "finetune"))
    optim = OptimConfig(lr=1e-5, total_steps=100, grad_accum=grad_accum)
    program = step_program(config, jax.numpy.dtype(prec.param_dtype), resolve_kernels(kernels), optim, "finetune",
                           False, remat, precision).bind(trainable)
    opt_state = jax.eval_shape(program.init, trainable)
    stats = program.run.lower(trainable, opt_state, frozen, _abstract_batch(rows, seq), None).compile().memory_analysis()
    n_trainable = _tree_size(trainable)
    return {"remat": remat, "precision": precision, "grad_accum": grad_accum, "rows": rows, "seq": seq,
            "params": _tree_size(params), "trainable_params": n_trainable,
            "argument_bytes": stats.argument_size_in_bytes, "output_bytes": stats.output_size_in_bytes,
            "temp_bytes": stats.temp_size_in_bytes, "alias_bytes": stats.alias_size_in_bytes,
            "peak_bytes": stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes,
            "state_bytes_per_trainable_param": (_tree_bytes(trainable) + _tree_bytes(opt_state)) / n_trainable,
            "frozen_bytes_per_param": _tree_bytes(frozen) / max(1, _tree_size(frozen))}


def residual_bytes(config, remat: str, precision: str, rows: int, seq: int, kernels: str | None = None) -> int:
    """Bytes the stage-`finetune` loss's backward pass keeps from its forward pass (the residuals of `jax.vjp`,
    counted from shapes, nothing compiled): what rematerialization trades against recomputation."""
    import jax

    from ..kernels import resolve_kernels
    from ..model import abstract_params
    from ..network import LlavaNetwork
    from ..train.loss import loss_fn
    from ..train.optim import merge_params, split_params, trainable_mask
    from ..train.precision import Precision

    prec = Precision(precision)
    params = abstract_params(config, prec.load_dtype)
    trainable, frozen = split_params(params, trainable_mask(params, "finetune"))
    network = LlavaNetwork(config, prec.compute_dtype, resolve_kernels(kernels), remat=remat)

    def backward_of(t, f, batch):
        return jax.vjp(lambda t: loss_fn(network, prec.compute_params(merge_params(t, f)), batch), t)[1]

    return _tree_bytes(jax.eval_shape(backward_of, trainable, frozen, _abstract_batch(rows, seq)))


def activation_bytes_per_token_per_layer(shape: str, remat: str, precision: str, layers: int = 1, seq: int = 128,
                                         kernels: str | None = None) -> float:
    """What one token costs in one decoder layer of `shape` between the forward and the backward pass: the
    residuals' growth with tokens and layers, (r(2L, 2T) - r(2L, T) - r(L, 2T) + r(L, T)) / (L * T), so that
    the weights (which grow with L only) and the embeddings and logits (with T only) cancel."""
    one, two = layer_cut_config(shape, layers), layer_cut_config(shape, 2 * layers)
    r = {(c, t): residual_bytes(cfg, remat, precision, 1, t, kernels)
         for c, cfg in ((1, one), (2, two)) for t in (seq, 2 * seq)}
    return (r[2, 2 * seq] - r[2, seq] - r[1, 2 * seq] + r[1, seq]) / (layers * seq)


@dataclasses.dataclass(frozen=True)
class MemoryBench:
    """What `train_memory_table` measures: `shape`'s layers cut to `layers`, micro-batches of `rows` x `seq`."""

    shape: str = "7b"
    layers: int = 2
    rows: int = 4
    seq: int = 256
    grad_accum: int = 4  # the extra rows: the same `rows` per optimizer step in `grad_accum` micro-batches
    remats: tuple[str, ...] = REMATS
    precisions: tuple[str, ...] = PRECISIONS
    kernels: str | None = None


def train_memory_table(bench: MemoryBench = MemoryBench(), progress: bool = True) -> dict:
    """Every remat x precision setting (one step of `rows` rows) with its activation bytes per token per layer,
    then `grad_accum` micro-batches of rows / grad_accum rows for each precision without remat. The result:
    {"bench": ..., "rows": [one dict per setting]}."""
    from tqdm.auto import tqdm

    config = layer_cut_config(bench.shape, bench.layers)
    settings = [(r, p) for p in bench.precisions for r in bench.remats]
    jobs = len(settings) + (len(bench.precisions) if bench.grad_accum > 1 else 0)
    bar = tqdm(total=jobs, desc="compiling train steps", unit="program", disable=not progress)
    rows = []
    for remat, precision in settings:
        row = step_memory(config, remat, precision, 1, bench.rows, bench.seq, bench.kernels)
        row["activation_bytes_per_token_per_layer"] = activation_bytes_per_token_per_layer(
            bench.shape, remat, precision, kernels=bench.kernels)
        rows.append(row)
        bar.update(1)
        log(f"remat {remat}, {precision}: peak {row['peak_bytes'] / 2**20:.0f} MiB, "
            f"{row['activation_bytes_per_token_per_layer'] / 1024:.1f} KiB per token per layer")
    if bench.grad_accum > 1:
        micro = max(1, bench.rows // bench.grad_accum)
        for precision in bench.precisions:
            rows.append(step_memory(config, "none", precision, bench.grad_accum, micro, bench.seq, bench.kernels))
            bar.update(1)
    bar.close()
    return {"bench": dataclasses.asdict(bench), "rows": rows}


# Device memory of the rule of thumb: (devices, bytes per device).
TARGETS = {"TPU v5e-16": (16, 16 * 2**30), "8x H100": (8, 80 * 10**9)}


def shape_params(shape: str) -> tuple[int, int]:
    """(all params, vision-tower params) of a benchmark shape, counted from its param shapes."""

    from ..config import config_from_dict
    from ..model import abstract_params

    params = abstract_params(config_from_dict(checkpoint_config(shape, "float32")))
    return _tree_size(params), _tree_size(params["vision_tower"])


def step_bytes_per_param(row: dict) -> float:
    """Bytes per trainable param while a step runs, the state donated (updated in place): the state counted
    from the trees, plus the gradients (the trainable params' dtype), plus under "mixed" the bf16 copy of the
    params the loss computes with."""
    grads = 2 if row["precision"] == "bf16" else 4
    return row["state_bytes_per_trainable_param"] + grads + (2 if row["precision"] == "mixed" else 0)


def rule_of_thumb(result: dict, shapes=("7b", "34b")) -> list[dict]:
    """Full fine-tuning (stage finetune: language model and projector; the vision tower frozen) of each shape
    under each precision (with and without accumulation), with params, gradients and optimizer state sharded
    over every device (FSDP): the GB per device, and how many tokens of activations per device fit in what is
    left, at each remat policy's bytes per token per layer measured on that shape's layer (the logits and the
    rest of the step not counted: a rule of thumb, not a plan)."""
    kernels = result["bench"].get("kernels")
    out = []
    for shape in shapes:
        activations = {(remat, precision): activation_bytes_per_token_per_layer(shape, remat, precision,
                                                                              kernels=kernels)
                       for remat in result["bench"]["remats"] for precision in result["bench"]["precisions"]}
        total, vision = shape_params(shape)
        layers = checkpoint_config(shape)["text_config"]["num_hidden_layers"]
        for row in result["rows"]:
            if row["remat"] != "none":
                continue
            per_param = step_bytes_per_param(row)
            state = per_param * (total - vision) + row["frozen_bytes_per_param"] * vision
            entry = {"shape": shape, "params": total, "precision": row["precision"], "grad_accum": row["grad_accum"],
                     "bytes_per_param": per_param, "total_gb": state / 1e9,
                     "activation_kib_per_token_per_layer": {r: activations[r, row["precision"]] / 1024
                                                             for r in REMATS if (r, row["precision"]) in activations}}
            for target, (devices, memory) in TARGETS.items():
                left = memory - state / devices
                entry[target] = {"gb_per_device": state / devices / 1e9, "tokens_per_device": {
                    remat: max(0, int(left // (activations[remat, row["precision"]] * layers)))
                    for remat in REMATS if (remat, row["precision"]) in activations}}
            out.append(entry)
    return out


def format_table(result: dict) -> str:
    """The table as Markdown (MiB; bytes per param)."""
    mib = 2**20
    lines = ["| remat | precision | grad accum | micro-batch | arguments MiB | outputs MiB | temp MiB | peak MiB | "
             "state B/param | activations KiB/token/layer |", "|---" * 10 + "|"]
    for r in result["rows"]:
        act = r.get("activation_bytes_per_token_per_layer")
        lines.append(f"| {r['remat']} | {r['precision']} | {r['grad_accum']} | {r['rows']}x{r['seq']} | "
                     f"{r['argument_bytes'] / mib:.0f} | {r['output_bytes'] / mib:.0f} | {r['temp_bytes'] / mib:.0f} | "
                     f"{r['peak_bytes'] / mib:.0f} | {r['state_bytes_per_trainable_param']:.1f} | "
                     f"{'' if act is None else f'{act / 1024:.1f}'} |")
    lines += ["", "| shape | precision | grad accum | bytes/param in a step | state GB | "
              + " | ".join(f"{t}: GB/device, tokens/device (remat none / dots / full)" for t in TARGETS) + " |",
              "|---" * (5 + len(TARGETS)) + "|"]
    for e in rule_of_thumb(result):
        cells = [f"{e[t]['gb_per_device']:.1f}, " + " / ".join(f"{n:,}" for n in e[t]["tokens_per_device"].values())
                 for t in TARGETS]
        lines.append(f"| {e['shape']} ({e['params'] / 1e9:.1f} B) | {e['precision']} | {e['grad_accum']} | "
                     f"{e['bytes_per_param']:.0f} | {e['total_gb']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
