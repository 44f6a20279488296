"""The transformers (PyTorch) side of the benchmark: `LlavaNextForConditionalGeneration` on the same
checkpoint, image and prompt, greedy, forced to the same number of new tokens.

It runs in its own child process that never imports jax nor llava_jax's model code (see `child.py`), so that
its peak RSS is its own: only this package's light helpers are imported.
"""

from __future__ import annotations

import time
import zlib

import numpy as np

from .inputs import bench_image
from .measure import decode_rate, log, peak_rss_bytes, summarize_runs, timed_load


def torch_dtype(name: str):
    """The torch dtype of a llava-jax dtype name ("float32", "bfloat16", "float16")."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(opts: dict):
    """`LlavaNextForConditionalGeneration.from_pretrained` as the benchmark times it (the model only: the
    processor is timed apart, as llava-jax's `load` reads no tokenizer); the model and `timed_load`'s figures,
    with the bytes of the params."""
    from transformers import LlavaNextForConditionalGeneration

    dtype = torch_dtype(opts["dtype"])
    model, loading = timed_load(lambda: LlavaNextForConditionalGeneration.from_pretrained(
        opts["model"], dtype=dtype).eval().to(torch_device(opts)))
    loading["param_bytes"] = int(sum(p.numel() * p.element_size() for p in model.parameters()))
    return model, loading


def load_only(opts: dict) -> dict:
    """Only the load (`llava-jax bench --load-only`): its time and memory."""
    import torch
    import transformers

    out = load_model(opts)[1]
    out["threads"] = torch.get_num_threads()
    out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    return out


def run(opts: dict) -> dict:
    """Load the model with transformers, then a cold run and `repeats` warm ones; the side's results."""
    import torch
    import transformers
    from transformers import AutoProcessor
    from transformers.generation.streamers import BaseStreamer

    dtype = torch_dtype(opts["dtype"])
    device = torch_device(opts)
    model, loading = load_model(opts)
    t = time.perf_counter()
    processor = AutoProcessor.from_pretrained(opts["model"])
    processor_load_s = time.perf_counter() - t
    gen = model.generation_config
    gen.eos_token_id = None  # forced length: never stop early (llava-jax: no stop ids)
    gen.pad_token_id = processor.tokenizer.pad_token_id or 0
    images = [bench_image(tuple(opts["image_size"]), opts.get("image"))] * opts["batch"]
    new_tokens = opts["new_tokens"]

    class Clock(BaseStreamer):
        """Timestamps of each `put`: the prompt first, then every generated token."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    runs = []
    for i in range(1 + opts["repeats"]):
        clock = Clock()
        t0 = time.perf_counter()
        inputs = processor(images=images, text=[opts["text"]] * len(images), return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        inputs = inputs.to(device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 streamer=clock if len(images) == 1 else None, generation_config=gen)
        t_end = time.perf_counter()
        new = out[:, inputs["input_ids"].shape[1]:]
        if len(clock.times) >= 2:  # times[0]: the prompt; times[1]: the first new token
            first, decode_s = clock.times[1], clock.times[-1] - clock.times[1]
        else:  # batches: streamers take one row only; time the first token with a 1-token generate
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=1, do_sample=False, generation_config=gen)
            first = t1 + (time.perf_counter() - t_end)
            decode_s = (t_end - t1) - (first - t1)
        result = {"ttft_s": first - t0, "preprocess_s": t1 - t0, "decode_s": decode_s,
               "decode_tok_s": decode_rate(new_tokens, decode_s),
               "tokens": new[0].cpu().tolist(), "new_tokens": int(new.shape[1]),
               "prompt_tokens": int(inputs["input_ids"].shape[1]),
               "input_ids_crc": zlib.crc32(inputs["input_ids"][0].cpu().numpy().astype(np.int64).tobytes())}
        runs.append(result)
        log(f"torch run {i}: ttft {result['ttft_s']:.2f} s, decode {result['decode_tok_s']:.2f} tok/s")
    out = summarize_runs(runs)
    out.update({
        **loading,
        "processor_load_s": processor_load_s,
        "peak_rss_gb": peak_rss_bytes() / 1e9,
        "tokens": runs[0]["tokens"],
        "new_tokens_generated": runs[0]["new_tokens"],
        "prompt_tokens": runs[0]["prompt_tokens"],
        "input_ids_crc": runs[0]["input_ids_crc"],
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    })
    return out


def torch_device(opts: dict) -> str:
    """`opts["device"]`: "cpu", "cuda", or "auto" (the default: CUDA where torch sees a GPU)."""
    import torch

    device = opts.get("device", "cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def logits(opts: dict) -> dict:
    """fp32 logits of one image prompt with transformers, saved to `opts["out"]` (.npy): the PyTorch half of the
    device check's logits comparison."""
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    dtype = torch_dtype(opts["dtype"])
    device = torch_device(opts)
    model = LlavaNextForConditionalGeneration.from_pretrained(opts["model"], dtype=dtype).eval().to(device)
    processor = AutoProcessor.from_pretrained(opts["model"])
    image = bench_image(tuple(opts["image_size"]), opts.get("image"))
    inputs = processor(images=[image], text=[opts["text"]], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.inference_mode():
        out = model(**inputs.to(device)).logits.float().cpu().numpy()
    np.save(opts["out"], out[0])
    return {"shape": list(out.shape), "device": device,
            "input_ids_crc": zlib.crc32(inputs["input_ids"][0].cpu().numpy().astype(np.int64).tobytes())}
