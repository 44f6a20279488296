"""Rematerialization, mixed precision and gradient accumulation in the train step (`trainer.step_program`), on
the tests' small LLaVA-NeXT (2 decoder layers, width 64, text rows): remat and accumulated micro-batches repeat
the plain step's losses, mixed precision stays within a bf16 bound of fp32 and trains every layer, bf16 keeps
its state in bf16; and the memory bench's activation counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llava_jax
from llava_jax.default_model import write_small_model
from llava_jax.train.loss import hf_inputs_batch
from llava_jax.train.optim import OptimConfig, split_params, trainable_mask
from llava_jax.train.trainer import step_program

STEPS = 20  # optimizer steps
LR = 1e-3
BF16_U = 2.0**-8  # bf16's unit roundoff: 8 significand bits (7 stored), round to nearest


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small model (fp32) and 4 text rows of 24 random tokens, every next token supervised: all four as one
    batch, and rows 0-1 / 2-3 as two micro-batches with the same token count each (so the mean of their mean
    losses is the big batch's mean loss, as `optax.MultiSteps` averages them)."""
    model = llava_jax.load(str(write_small_model(tmp_path_factory.mktemp("small") / "model")), mesh=None)
    ids = np.random.default_rng(0).integers(3, 32000, (4, 24))
    whole = hf_inputs_batch(model, ids, ids)
    return model, whole, [hf_inputs_batch(model, ids[:2], ids[:2]), hf_inputs_batch(model, ids[2:], ids[2:])]


def run_steps(model, batches, steps, remat="none", precision="fp32"):
    """`steps` optimizer steps of stage finetune, each over all of `batches` (accumulated when several); the
    losses per optimizer step (the mean over its micro-batches), the trainable params and the optimizer state."""
    params = model.params
    if precision == "bf16":  # what `train` loads for bf16
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    trainable, frozen = split_params(params, trainable_mask(params, "finetune"))
    optim = OptimConfig(lr=LR, total_steps=steps, warmup_ratio=0.0, grad_accum=len(batches))
    program = step_program(model.config, jax.tree_util.tree_leaves(params)[0].dtype, model.kernels, optim,
                           "finetune", False, remat, precision).bind(trainable)
    opt_state = program.init(trainable)
    losses = []
    for i in range(steps * len(batches)):
        trainable, opt_state, loss, _ = program.run(trainable, opt_state, frozen, batches[i % len(batches)], None)
        losses.append(float(loss))
    return np.array(losses).reshape(steps, len(batches)).mean(axis=1), trainable, opt_state


@pytest.fixture(scope="module")
def plain(small):
    """20 fp32 steps on the big batch without remat: the reference run."""
    model, whole, _ = small
    losses, _, _ = run_steps(model, [whole], STEPS)
    assert losses[-1] < 0.5 * losses[0]  # it trains: no comparison below is between two flat lines
    return losses


# Each run below costs a step-program compilation (most of a test's time), so each checks two things at once.


def test_full_remat_and_accumulated_micro_batches_repeat_the_plain_run(small, plain):
    """Remat "full" over two accumulated micro-batches of 2 rows gives the losses of the plain step over the 4
    rows, for 20 optimizer steps. Recomputing a layer runs the same ops on the same values (XLA may fuse the
    recomputed graph differently, nothing more), and the accumulated gradient is the big batch's up to fp32
    summation order. Bound 1e-6 relative on every loss: a few fp32 ulps per step compounded over 20 Adam steps
    (measured 1.2e-7; remat "dots" alone measured the same). A wrong recomputation, or one micro-batch lost,
    moves the losses by far more: at lr 1e-3 each step changes the loss by about 5%."""
    model, _, micro = small
    losses, _, _ = run_steps(model, micro, STEPS, remat="full")
    np.testing.assert_allclose(losses, plain, rtol=1e-6, atol=0)


def test_mixed_precision_with_dots_remat_stays_within_the_bf16_bound(small, plain):
    """fp32 masters, bf16 compute, remat "dots", two accumulated micro-batches: every loss of the 20 steps within
    2u relative of the plain fp32 run (u = 2^-8, bf16's unit roundoff). Why 2u: the loss is a mean over many
    tokens of log-probabilities from fp32-accumulated matmuls of bf16-rounded operands; independent roundings of
    relative size <= u average out in those sums, leaving O(u) in the loss from the forward pass, and at most as
    much again from the params' drift (Adam normalizes the gradients, whose bf16 error is itself O(u)).
    Measured without remat: 2.6e-3 (0.7u). The state stays fp32, the accumulator included, and every decoder
    weight trains: on XLA:CPU the regression test of the kernels' differentiable set (the inference scan views
    16-bit stacks as uint16, which carries no gradient: the layers stayed frozen without it)."""
    model, _, micro = small
    losses, trainable, opt_state = run_steps(model, micro, STEPS, remat="dots", precision="mixed")
    assert np.all(np.abs(losses - plain) <= 2 * BF16_U * plain), np.abs(losses - plain) / plain
    assert np.any(losses != plain)  # the compute really was bf16
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves((trainable, opt_state)) if jnp.ndim(x)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), model.params["language_model"]["layers"],
                                   trainable["language_model"]["layers"])
    assert all(jax.tree_util.tree_leaves(moved)), moved


def test_bf16_keeps_params_and_optimizer_state_in_bf16(small):
    """--precision bf16: params and Adam moments bf16; optax.MultiSteps accumulates the micro-batch gradients
    in fp32 (the accumulator is fp32 whatever the params' dtype)."""
    model, _, _ = small
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), model.params)
    trainable, _ = split_params(params, trainable_mask(params, "finetune"))
    program = step_program(model.config, jnp.dtype(jnp.bfloat16), model.kernels,
                           OptimConfig(lr=LR, total_steps=2, grad_accum=2), "finetune", False, "none",
                           "bf16").bind(trainable)
    state = program.init(trainable)
    moments = [x.dtype for x in jax.tree_util.tree_leaves((state.inner_opt_state, trainable)) if jnp.ndim(x)]
    assert set(moments) == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree_util.tree_leaves(state.acc_grads)} == {jnp.dtype(jnp.float32)}


def test_memory_bench_counts_what_each_remat_policy_keeps():
    """`llava-jax bench --train-memory`'s activation bytes per token per layer (residuals of `jax.vjp`, shapes
    only) on the bench's tiny shape (width 64): full remat keeps each layer's input and nothing else, exactly
    64 x 4 bytes a token in fp32 and 64 x 2 in bf16 compute; "dots" keeps more (the weight matmuls' outputs)."""
    from llava_jax.bench.train_memory import activation_bytes_per_token_per_layer as per_token

    width = 64
    assert per_token("tiny", "full", "fp32", seq=16) == width * 4
    assert per_token("tiny", "full", "mixed", seq=16) == width * 2
    assert per_token("tiny", "dots", "fp32", seq=16) > width * 4


def test_unknown_settings_are_input_errors():
    from llava_jax.errors import InputError
    from llava_jax.train.trainer import TrainConfig

    base = dict(stage="finetune", data="d.json", image_folder=".", output="out")
    with pytest.raises(InputError, match="--precision must be one of fp32, mixed, bf16, got 'fp16'"):
        TrainConfig(**base, precision="fp16")
    with pytest.raises(InputError, match="--remat must be one of none, dots, full, got 'all'"):
        TrainConfig(**base, remat="all")
