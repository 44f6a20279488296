"""Sharded training: the train state and the batches on a (data, model) mesh, placed by the inference rule table.

`TrainSharding` gives every array of a train step its `NamedSharding` from `llava_jax.sharding` (the same
`PARAM_AXES` / `AXIS_RULES`, the same replication of indivisible dimensions):

- params (trainable and frozen) and their gradients: the rule table (with `fsdp`, `FSDP_RULES` too: the
  `embed` dimension of weight matrices split over `data`);
- the optimizer state: each moment like the param it belongs to (matched by its path: AdamW's `mu` / `nu` trees
  mirror the trainable tree), counters and other scalars replicated; with `fsdp` the moments are thus split over
  `data` as well, without it they are split like the params (over `model`);
- the batch: rows over `data`; the flat arrays (crops, image features, targets) over `data` on their first
  dimension, padded to a multiple of the data axis (`pad_flat`).

`step_jit` jits the train step with these as explicit in/out shardings and donates the trainable params and the
optimizer state (their buffers are reused for the updated ones).

Multi-host: the global batch of `batch_size` rows is split into `shares`, one per group of processes holding a
block of the data axis (`process_share`, from `jax.process_index()` / `jax.process_count()`); each process
collates only its share's rows (so it reads only their images), the processes agree on padded sizes (one tiny
all-gather), and each turns its share into its slice of the global batch (`localize_share`: flat indices
offset to the global layout). `combine_shares` builds the same global batch from every share on one host: the
test of that split, without several processes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..errors import InputError
from ..sharding import DATA, ShardingRules, put
from .loss import LossBatch

ROW_FIELDS = ("input_ids", "attention_mask", "positions")


class TrainSharding:
    """Shardings of the arrays of a train step on one mesh (see the module docstring)."""

    def __init__(self, rules: ShardingRules):
        self.rules = rules
        self.mesh = rules.mesh

    @property
    def data_size(self) -> int:
        return self.rules.data_size

    @property
    def replicated(self) -> NamedSharding:
        return self.rules.replicated

    def params(self, tree):
        """Shardings of a param tree (None leaves, as `split_params` leaves them, stay None)."""
        return self.rules.param_shardings(tree)

    def opt_state(self, opt_state, trainable):
        """Shardings of an optimizer state (arrays or ShapeDtypeStructs) for the `trainable` tree: a leaf whose
        path ends with a trainable param's path and has its shape gets that param's sharding (AdamW's moments,
        MultiSteps' accumulated gradients); anything else (step counters) is replicated."""
        shardings = self.params(trainable)
        by_path = {tuple(_key(k) for k in path): (tuple(leaf.shape), s) for (path, leaf), s in zip(
            jax.tree_util.tree_leaves_with_path(trainable), jax.tree_util.tree_leaves(shardings), strict=True)}

        def one(path, leaf):
            keys = tuple(_key(k) for k in path)
            for start in range(len(keys)):
                shape, s = by_path.get(keys[start:], (None, None))
                if s is not None and shape == tuple(leaf.shape):
                    return s
            return self.replicated

        return jax.tree_util.tree_map_with_path(one, opt_state)

    def batch(self) -> LossBatch:
        """Shardings of a `LossBatch` (whatever its bucket shapes: they divide the data axis, see `pad_flat`)."""
        rows = NamedSharding(self.mesh, P(DATA, None))
        flat = NamedSharding(self.mesh, P(DATA))
        crops = NamedSharding(self.mesh, P(DATA, None, None, None))
        return LossBatch(rows, rows, rows, crops, flat, flat, flat, flat, flat)

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.data_size:
            raise InputError(f"--batch-size {batch_size} does not split over the mesh's data axis of "
                             f"{self.data_size}: use a multiple of it")

    def put_batch(self, batch: LossBatch) -> LossBatch:
        """A host batch -> global arrays (`batch` is this process's slice when `shares` > 1, see
        `localize_share`; else the whole batch, the same on every process)."""
        shardings = self.batch()
        if jax.process_count() == 1 or process_share_count(self.data_size, jax.process_count()) == 1:
            return jax.tree_util.tree_map(put, batch, shardings)
        return jax.tree_util.tree_map(
            lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), batch, shardings)

    def step_jit(self, step, trainable, opt_state, frozen):
        """`step(trainable, opt_state, frozen, batch, key) -> (trainable, opt_state, loss, grad_norm)` jitted with
        explicit shardings (the dropout key replicated), the train state (arguments 0 and 1) donated."""
        t = self.params(trainable)
        o = self.opt_state(opt_state, trainable)
        r = self.replicated
        return jax.jit(step, in_shardings=(t, o, self.params(frozen), self.batch(), r), out_shardings=(t, o, r, r),
                       donate_argnums=(0, 1))

    def init_jit(self, init, trainable):
        """`init(trainable) -> opt_state` jitted to produce the optimizer state on its shardings."""
        return jax.jit(init, in_shardings=(self.params(trainable),),
                       out_shardings=self.opt_state(jax.eval_shape(init, trainable), trainable))


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


# ---- the flat arrays of a batch ------------------------------------------------------------------------------
def _pad(x: np.ndarray, size: int, value) -> np.ndarray:
    x = np.asarray(x)
    if len(x) == size:
        return x
    return np.concatenate([x, np.full((size - len(x), *x.shape[1:]), value, x.dtype)])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_flat(batch: LossBatch, multiple: int, sizes: tuple[int, int, int] | None = None) -> LossBatch:
    """Crops, image features and targets padded (zero crops, dropped features, weight-0 targets) to `sizes`
    (crops, features, targets; default their own) rounded up to a multiple of `multiple` (the data axis)."""
    ids = np.asarray(batch.input_ids)
    sizes = sizes or (len(batch.crops), len(batch.feature_index), len(batch.target_ids))
    n_crops, n_feat, n_targets = (_round_up(n, multiple) for n in sizes)
    return batch.replace(crops=_pad(batch.crops, n_crops, 0), feature_index=_pad(batch.feature_index, n_feat, 0),
                         feature_positions=_pad(batch.feature_positions, n_feat, ids.size),
                         target_positions=_pad(batch.target_positions, n_targets, 0),
                         target_ids=_pad(batch.target_ids, n_targets, 0),
                         target_weight=_pad(batch.target_weight, n_targets, 0))


# ---- multi-host: each process reads its share of every batch -------------------------------------------------
def process_share_count(data_size: int, process_count: int) -> int:
    """Into how many shares a batch splits: one per block of the data axis a group of processes holds."""
    if data_size % process_count and process_count % data_size:
        raise InputError(f"the mesh's data axis ({data_size}) and the process count ({process_count}) must divide "
                         "one another")
    return min(data_size, process_count)


def process_share(batch_rows: int, data_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """(share, shares): which block of a batch's rows this process reads. The devices of `jax.make_mesh` are in
    process order and the data axis is the outer one, so process p holds data block p * D / P (D >= P) or
    p // (P / D) (P > D: the model axis spans processes, which then read the same rows)."""
    shares = process_share_count(data_size, process_count)
    if batch_rows % shares:
        raise InputError(f"--batch-size {batch_rows} does not split into {shares} per-process shares")
    return process_index * shares // process_count, shares


def share_rows(rows: list, share: int, shares: int, batch_rows: int) -> tuple[list, bool]:
    """The row indices (into the data set) of one share of a batch `rows` (the last batch of an epoch may be
    short); (rows, real). A share with no real row gets the batch's first row with `real` False: its targets
    are then weighted 0 (a share must not be empty: every process runs the same program)."""
    per = batch_rows // shares
    mine = list(rows[share * per: (share + 1) * per])
    return (mine, True) if mine else ([rows[0]], False)


def share_sizes(batch: LossBatch) -> np.ndarray:
    """(seq, crops, features, targets) of one collated share: the sizes the processes agree on."""
    return np.array([batch.input_ids.shape[1], len(batch.crops), len(batch.feature_index), len(batch.target_ids)],
                    np.int64)


def agree_sizes(sizes: np.ndarray) -> np.ndarray:
    """The element-wise max of every process's `share_sizes` (an all-gather of 4 numbers)."""
    if jax.process_count() == 1:
        return sizes
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(sizes)).max(axis=0)


def localize_share(batch: LossBatch, sizes, share: int, shares: int, multiple: int, tokens_per_crop: int,
                   real: bool = True) -> LossBatch:
    """One share's collated batch -> its slice of the global batch: rows padded to the agreed `seq`, the flat
    arrays to the agreed sizes (rounded up to `multiple`, the data axis' blocks per share), and flat indices
    moved to where the share sits in the global batch (rows `share * rows`..., crops likewise, an encoder row
    being crop * tokens_per_crop + k; padding features point past the global end: dropped). `real` False:
    every target weighted 0 (a filler share, see `share_rows`)."""
    seq, n_crops, n_feat, n_targets = (int(v) for v in sizes)
    ids = np.asarray(batch.input_ids)
    rows, old = ids.shape
    if old > seq:
        raise ValueError(f"share sequence length {old} > agreed {seq}")
    widen = lambda x, v: np.pad(np.asarray(x), ((0, 0), (0, seq - old)), constant_values=v)  # noqa: E731
    b = pad_flat(batch.replace(input_ids=widen(ids, 0), attention_mask=widen(batch.attention_mask, False),
                               positions=widen(batch.positions, 0)), multiple, (n_crops, n_feat, n_targets))
    n_crops = len(b.crops)
    drop = shares * rows * seq  # past the end of the global batch

    def moved(flat):  # a position in this share's (rows, old) layout -> in the global (shares * rows, seq) one
        flat = np.asarray(flat).astype(np.int64)
        local = (flat // old) * seq + flat % old + share * rows * seq
        return np.where(flat >= rows * old, drop, local).astype(np.int32)

    index = np.asarray(b.feature_index)
    weight = np.asarray(b.target_weight) if real else np.zeros_like(b.target_weight)
    return b.replace(feature_positions=moved(b.feature_positions), target_positions=moved(b.target_positions),
                     feature_index=np.where(index < 0, index, index + share * n_crops * tokens_per_crop),
                     target_weight=weight)


def combine_shares(parts: list[LossBatch]) -> LossBatch:
    """The global batch from every share's `localize_share` output, in share order (what the processes'
    slices make together)."""
    return jax.tree_util.tree_map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *parts)


class ShardedFeed:
    """Rows of a global batch (`TokenizedExample`s, the same list on every process) -> the global batch on the
    mesh; this process collates only its share of the rows (`process_share`)."""

    def __init__(self, placement: TrainSharding, make_collator, batch_size: int, tokens_per_crop: int,
                 process_index: int | None = None, process_count: int | None = None):
        """make_collator(rows) -> a collator of `rows`-row batches (a `Collator`)."""
        placement.check_batch_size(batch_size)
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        self.placement, self.batch_size, self.tokens_per_crop = placement, batch_size, tokens_per_crop
        self.share, self.shares = process_share(batch_size, placement.data_size, index, count)
        self.collate = make_collator(batch_size // self.shares)

    def host_batch(self, rows: list) -> LossBatch:
        """This process's slice of the global batch, as numpy (the whole batch when there is one share)."""
        mine, real = share_rows(rows, self.share, self.shares, self.batch_size)
        local = self.collate(mine)
        if self.shares == 1:
            return pad_flat(local, self.placement.data_size)
        return localize_share(local, agree_sizes(share_sizes(local)), self.share, self.shares,
                              self.placement.data_size // self.shares, self.tokens_per_crop, real)

    def __call__(self, rows: list) -> LossBatch:
        return self.placement.put_batch(self.host_batch(rows))


def scalar(x) -> float:
    """A replicated scalar (loss, grad norm) as a float, also when the array spans other processes' devices."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return float(x)
