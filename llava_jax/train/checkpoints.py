"""Train-state checkpoints (Orbax `CheckpointManager` under OUT/checkpoints) and the final model (OUT itself).

The train state is every array the next step needs: the trainable params, the optimizer state, the RNG key,
and the step counter (which is also the data position: the data order is a function of the seed and the epoch,
see `trainer.py`). It is saved as its flat list of leaves (the tree's structure comes from the run's own fresh
state when restoring, so optax's named tuples and None leaves need no Orbax support), each array as the shards
its devices hold (on a mesh no host gathers the state; restoring places each leaf onto the sharding of the
resuming run's state, so a run saved on one mesh resumes on another), plus a JSON record
(step, epoch, batch in epoch, the run's settings) for humans and for refusing a resume with other settings.

The final params are written as a converted checkpoint (`params/`, `llava_jax_config.json`, the tokenizer and
config files, `checksums.json`: see `llava_jax.checkpoint`), so `llava_jax.load(OUT)` generates with them.
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np

from ..checkpoint import CONFIG_FILE, PARAMS_DIR, SUPPORT_FILES
from ..errors import CheckpointError
from ..tempdir import make_temp_dir

CHECKPOINT_DIR = "checkpoints"


class TrainCheckpoints:
    """Save and restore train states under `output/checkpoints` (keeps the newest `keep`)."""

    def __init__(self, output: str, keep: int = 2):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(os.path.join(output, CHECKPOINT_DIR))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, record: dict) -> None:
        """Write `state` (any pytree of arrays) and the JSON `record` as checkpoint `step`."""
        import orbax.checkpoint as ocp

        # jax.Arrays as they are: each process writes the shards it holds, nothing is gathered
        leaves = {f"{i:05d}": x for i, x in enumerate(jax.tree_util.tree_leaves(state))}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(leaves),
                                                        record=ocp.args.JsonSave(record)), force=True)
        self.manager.wait_until_finished()

    def restore(self, like, step: int | None = None) -> tuple[object, dict]:
        """(state shaped like `like`, record) of checkpoint `step` (default: the newest). Each array is restored
        onto the sharding of its counterpart in `like` (each process reads only its shards): a state saved on
        one mesh resumes on another."""
        import orbax.checkpoint as ocp

        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"--resume: no train-state checkpoint in {self.directory}")
        leaves, treedef = jax.tree_util.tree_flatten(like)
        abstract = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=_sharding(x))
                    for i, x in enumerate(leaves)}
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
            record=ocp.args.JsonRestore()))
        state = jax.tree_util.tree_unflatten(treedef, [out.state[k] for k in sorted(out.state)])
        return state, dict(out.record)

    def close(self) -> None:
        self.manager.close()


def _sharding(x):
    """Where a restored leaf goes: `x`'s sharding, or the default device for a host value."""
    if isinstance(x, jax.Array):
        return x.sharding
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def write_model(output: str, params, config, source_dir: str | None) -> None:
    """Write `params` into `output` as a converted checkpoint that `llava_jax.load(output)` reads: the param
    tree (replacing an earlier one atomically), the normalized config, the source model's tokenizer and config
    files, and checksums of those files (the training files next to them are left out)."""
    from convert.converter import copy_support_files, param_file_parts, write_config
    from convert.writer import save_params

    from ..integrity import write_manifest

    os.makedirs(output, exist_ok=True)
    tmp = make_temp_dir(output, prefix=".model-")
    try:
        save_params(os.path.join(tmp, PARAMS_DIR), jax.tree_util.tree_map(np.asarray, params))
        write_config(tmp, config)
        if source_dir:
            copy_support_files(source_dir, tmp)
        for name in sorted(os.listdir(tmp)):  # replace the previous model's entries, then move the new ones in
            target = os.path.join(output, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = {os.path.relpath(os.path.join(root, f), output).replace(os.sep, "/")
             for root, _, names in os.walk(output) for f in names}
    model_files = {f for f in files if f.startswith(PARAMS_DIR + "/") or f == CONFIG_FILE
                   or ("/" not in f and _is_support_file(f))}
    write_manifest(output, param_file_parts, skip=files - model_files)


def _is_support_file(name: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, p) for p in SUPPORT_FILES)
