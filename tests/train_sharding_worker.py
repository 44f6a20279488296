"""Runs in a subprocess of test_train_sharded.py with 8 simulated CPU devices (XLA_FLAGS set before jax imports).

Usage: python train_sharding_worker.py OUT.json. One tiny LLaVA-NeXT (the fine-tuning tests' small model with 8
text heads, 4 kv heads and 8 vision heads: every weight but the kv projections on model=8 divides the model
axis) is fine-tuned for 3 optimizer steps (batch 8, stage finetune: projector and language model train, the
vision tower is frozen) on one device and on meshes 1x8, 2x4, 4x2, 8x1 and 2x4 with FSDP. Then a run is
interrupted after step 1 on 2x4, resumed on 4x2 and interrupted after step 2, resumed on one device to the end.
It records the losses, the largest difference of every final param from the single-device run's, the param
shardings and the bytes of params + optimizer state per device; test_train_sharded.py asserts on the JSON.
"""

import os
import sys

# 8 devices; cheaper LLVM code generation: six train-step programs compile here, which dominates the run time
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: `convert`

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import llava_jax  # noqa: E402
from llava_jax import sharding  # noqa: E402
from llava_jax.default_model import small_config  # noqa: E402
from llava_jax.prompt import mistral_tokenizer_dir  # noqa: E402
from llava_jax.random_checkpoint import write_random_checkpoint  # noqa: E402
from llava_jax.train.checkpoints import TrainCheckpoints  # noqa: E402
from llava_jax.train.collate import Collator, tokenize_examples  # noqa: E402
from llava_jax.train.data import load_dataset  # noqa: E402
from llava_jax.train.optim import OptimConfig, merge_params, split_params, trainable_mask  # noqa: E402
from llava_jax.train.sharded import ShardedFeed  # noqa: E402
from llava_jax.train.trainer import step_program  # noqa: E402

MESHES = ["data=1,model=8", "data=2,model=4", "data=4,model=2", "data=8,model=1"]
BATCH, STEPS = 8, 3
OPTIM = OptimConfig(lr=1e-3, total_steps=STEPS, warmup_ratio=0.0)


def build_model(path: Path) -> str:
    config = small_config()
    config["text_config"].update(num_attention_heads=8, num_key_value_heads=4)  # head_dim 8
    config["vision_config"].update(num_attention_heads=8)  # head_dim 4
    mistral_tokenizer_dir(path)
    write_random_checkpoint(path, config, "float32", seed=4)
    return str(path)


class Runner:
    """The trainer's step (`trainer.step_program`, the program `train` runs) on one mesh: params placed by the
    rule table, the batch split over `data` (`ShardedFeed`), the train state donated."""

    def __init__(self, model, items, mesh, fsdp=False):
        self.mesh = None if mesh is None else sharding.make_mesh(mesh)
        host = jax.tree_util.tree_map(np.asarray, model.params)
        trainable, frozen = split_params(host, trainable_mask(host, "finetune"))
        self.program = step_program(model.config, model.dtype, model.kernels, OPTIM, "finetune", False,
                                    mesh=self.mesh, fsdp=fsdp).bind(trainable, frozen)
        placement = self.program.placement
        if placement is None:
            self.feed = Collator.for_examples(model, items, BATCH, 512)
            self.trainable, self.frozen = jax.device_put(trainable), jax.device_put(frozen)
        else:
            self.feed = ShardedFeed(placement, lambda rows: Collator.for_examples(model, items, rows, 512), BATCH,
                                    model.config.tokens_per_crop)
            self.trainable = jax.device_put(trainable, placement.params(trainable))
            self.frozen = jax.device_put(frozen, placement.params(frozen))
        self.state = {"trainable": self.trainable, "opt_state": self.program.init(self.trainable)}

    def step(self, rows) -> tuple[float, float]:
        """(loss, gradient norm) of one optimizer step on `rows`."""
        t, o, loss, norm = self.program.run(self.state["trainable"], self.state["opt_state"], self.frozen,
                                            self.feed(rows), None)
        self.state = {"trainable": t, "opt_state": o}
        return float(loss), float(norm)

    def params(self) -> dict:
        merged = merge_params(self.state["trainable"], self.frozen)
        return {sharding.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(merged)}

    def bytes_per_device(self) -> int:
        return max(sharding.device_bytes([self.state["trainable"], self.frozen, self.state["opt_state"]]).values())

    def specs(self) -> dict:
        merged = merge_params(self.state["trainable"], self.frozen)
        return {sharding.path_str(p): [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
                for p, x in jax.tree_util.tree_leaves_with_path(merged)}

    def opt_specs(self) -> list:
        return sorted({str(tuple(x.sharding.spec)) for x in jax.tree_util.tree_leaves(self.state["opt_state"])})


def write_text_data(folder: Path) -> str:
    """8 text-only rows (the vision tower, frozen, is then not in the step program: it halves compile time)."""
    words = ["red", "blue", "green", "yellow"]
    rows = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"Say {words[i % 4]} {i + 1} times."},
                                               {"from": "gpt", "value": " ".join([words[i % 4]] * (i + 1))}]}
            for i in range(BATCH)]
    (folder / "data.json").write_text(json.dumps(rows))
    return str(folder / "data.json")


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def main(out_path):
    t0, c0 = time.time(), time.process_time()
    root = Path(tempfile.mkdtemp())
    model = llava_jax.load(build_model(root / "model"), mesh=None)
    examples, _ = load_dataset(write_text_data(root), str(root))
    items, _ = tokenize_examples(model, examples, "mistral_instruct", 512, progress=False)
    # three different batches of the 8 rows (the rows of a step differ in order, hence in their padding)
    batches = [[items[i] for i in np.random.default_rng([0, s]).permutation(BATCH)] for s in range(STEPS)]

    ref = Runner(model, items, None)
    ref_losses = [ref.step(rows) for rows in batches]
    ref_params = ref.params()
    start = Runner(model, items, None).params()
    entry = {"devices": jax.device_count(), "ref_steps": ref_losses, "ref_bytes": ref.bytes_per_device(),
             "moved": max_diff(ref_params, start), "param_scale": max(float(np.abs(v).max()) for v in start.values()),
             "meshes": {}}
    runners = {}
    for name, mesh, fsdp in [(m, m, False) for m in MESHES] + [("fsdp data=2,model=4", "data=2,model=4", True)]:
        run = runners[name] = Runner(model, items, mesh, fsdp)
        donated = run.state["trainable"]
        losses = [run.step(rows) for rows in batches]
        entry["meshes"][name] = {
            "steps": losses, "param_diff": max_diff(run.params(), ref_params),
            "bytes_per_device": run.bytes_per_device(), "specs": run.specs(), "opt_specs": run.opt_specs(),
            "donated": all(x.is_deleted() for x in jax.tree_util.tree_leaves(donated)),
        }

    entry["parity_seconds"], entry["parity_cpu_seconds"] = time.time() - t0, time.process_time() - c0
    # a train state saved on 2x4 after step 1, resumed on 4x2 for step 2, then on one device for step 3
    checkpoints = TrainCheckpoints(str(root / "moved"))
    losses = []
    for step, mesh in enumerate(["data=2,model=4", "data=4,model=2", None]):
        run = Runner(model, items, mesh)
        if step:
            run.state, _ = checkpoints.restore(run.state)
        losses.append(run.step(batches[step]))
        checkpoints.save(step + 1, run.state, {"step": step + 1})
    checkpoints.close()
    entry["resume"] = {"steps": losses, "param_diff": max_diff(run.params(), ref_params)}
    entry["seconds"], entry["cpu_seconds"] = time.time() - t0, time.process_time() - c0
    with open(out_path, "w") as f:
        json.dump(entry, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
