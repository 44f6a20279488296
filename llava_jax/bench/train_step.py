"""`llava-jax bench --train-step`: one fine-tuning step (stage `finetune`: projector + language model, vision
tower frozen; loss, backward, clip to norm 1.0, AdamW) on both sides, the same checkpoint, batch and prompt, fp32.

Each side runs in its own child process (`child.py`, sides `jax_train` and `torch_train`): a cold step (llava-jax
compiles it), then `repeats` timed steps; tokens/s = batch * sequence length / the best step time; peak RSS of
the process. The batch is the benchmark prompt with its image, `batch` times, every text token supervised; both
sides build it with the checkpoint's own processor (llava-jax's, transformers' `AutoProcessor`: the same ids,
`tests/test_processor.py`).
"""

from __future__ import annotations

import time

import numpy as np

from .inputs import bench_image
from .measure import log, peak_rss_bytes


def _labels(ids: np.ndarray, image_token: int) -> np.ndarray:
    labels = np.where(ids == image_token, -100, ids)
    labels[:, 0] = -100  # the first token is predicted by nothing
    return labels


def jax_run(opts: dict) -> dict:
    """The llava-jax side: the trainer's step program on the batch."""
    import jax

    import llava_jax

    from ..train.loss import hf_inputs_batch
    from ..train.optim import OptimConfig, split_params, trainable_mask
    from ..train.trainer import step_program

    model = llava_jax.load(opts["model"], dtype="float32", mesh=None, kernels=opts.get("kernels"))
    images = [bench_image(tuple(opts["image_size"]), opts.get("image"))] * opts["batch"]
    inputs = model.processor(images=images, text=[opts["text"]] * opts["batch"], padding=True)
    ids = inputs["input_ids"]
    batch = hf_inputs_batch(model, ids, _labels(ids, model.config.image_token_id), inputs["pixel_values"],
                            inputs.get("image_sizes"), inputs["attention_mask"])
    trainable, frozen = split_params(model.params, trainable_mask(model.params, "finetune"))
    program = step_program(model.config, model.dtype, model.kernels, OptimConfig(lr=1e-5, total_steps=100, warmup_ratio=0.0),
                           "finetune", False).bind(trainable)
    state = (trainable, program.init(trainable))
    times, losses = [], []
    for i in range(1 + opts["repeats"]):
        t = time.perf_counter()
        *state, loss, _ = program.run(state[0], state[1], frozen, batch, None)
        losses.append(float(jax.block_until_ready(loss)))
        times.append(time.perf_counter() - t)
        log(f"jax train step {i}: {times[-1]:.2f} s, loss {losses[-1]:.4f}")
    return _result(times, ids.shape, losses, int(np.asarray(batch.target_weight).sum()))


def torch_run(opts: dict) -> dict:
    """The PyTorch side: transformers' model with `labels`, `torch.optim.AdamW`, `clip_grad_norm_`."""
    import torch
    from transformers import (
        AutoConfig,
        AutoProcessor,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
    )

    config = AutoConfig.from_pretrained(opts["model"])
    cls = LlavaNextForConditionalGeneration if config.model_type == "llava_next" else LlavaForConditionalGeneration
    model = cls.from_pretrained(opts["model"], dtype=torch.float32)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("model.vision_tower."))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)  # as the llava-jax side
    processor = AutoProcessor.from_pretrained(opts["model"])
    images = [bench_image(tuple(opts["image_size"]), opts.get("image"))] * opts["batch"]
    inputs = processor(images=images, text=[opts["text"]] * opts["batch"], return_tensors="pt", padding=True)
    ids = inputs["input_ids"].numpy()
    inputs["labels"] = torch.tensor(_labels(ids, config.image_token_id))
    times, losses = [], []
    for i in range(1 + opts["repeats"]):
        t = time.perf_counter()
        loss = model(**inputs).loss
        losses.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        log(f"torch train step {i}: {times[-1]:.2f} s, loss {loss.item():.4f}")
    return _result(times, ids.shape, losses, int((inputs["labels"][:, 1:] != -100).sum()))


def _result(times: list[float], shape, losses: list[float], targets: int) -> dict:
    best = min(times[1:] or times)
    return {"step_s": best, "cold_step_s": times[0], "step_runs_s": times, "batch": int(shape[0]),
            "seq_len": int(shape[1]), "targets": targets, "tokens_per_s": shape[0] * shape[1] / best,
            "first_loss": losses[0], "losses": losses, "peak_rss_gb": peak_rss_bytes() / 1e9}
