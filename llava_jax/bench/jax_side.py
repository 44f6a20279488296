"""The llava-jax side of the benchmark (run in its own child process, see `child.py`).

Every run goes through the one pipeline the library uses: host preprocessing (the processor, then
`ImageCrops.create`), then `textgen.generate_token_rows` (bucket, left-pad, place the images, then the engine:
embed, insert_images, prefill, decode). Its `on_tokens` callback marks the end of prefill (the first token is
on the host) and the end of decoding.

Vision is split from prefill without a second copy of the pipeline: for the run, the engine's `embeddings`
(embed + insert_images: the vision tower, projector and packing) is wrapped, on this engine instance only, by a
timer that blocks until its result is ready. That sync point is the only change to the pipeline; in the cold
run it keeps XLA from compiling prefill while the vision programs still run (a small overlap on a CPU whose
cores both already do one or the other).
"""

from __future__ import annotations

import time
import zlib

import numpy as np

from .inputs import bench_image
from .measure import (
    CompileLog,
    decode_rate,
    log,
    peak_rss_bytes,
    summarize_runs,
    text_weight_bytes,
    timed_load,
)

# The engine's programs (`GenerationEngine.embed`, `.insert_images` (one per AnyRes pinpoint), `.prefill`,
# `.decode`) as `jax.monitoring` names them.
MODEL_PROGRAMS = ("jit(_embed)", "jit(_insert_images)", "jit(_prefill)", "jit(_decode)")


class _TimedEmbeddings:
    """Stands in for `engine.embeddings` during one run: calls it, waits for the result, notes when it
    started and ended and the batch's padded length (the prompt bucket the pipeline chose)."""

    def __init__(self, embeddings):
        self.embeddings = embeddings
        self.start = self.end = None
        self.prompt_bucket = None

    def __call__(self, params, batch):
        import jax

        self.start = time.perf_counter()
        self.prompt_bucket = int(batch.input_ids.shape[1])
        out = jax.block_until_ready(self.embeddings(params, batch))
        self.end = time.perf_counter()
        return out


def run_once(model, text: str, images: list, new_tokens: int) -> dict:
    """One timed generation of exactly `new_tokens` greedy tokens per row (no stop ids)."""
    from ..batch import ImageCrops
    from ..textgen import generate_token_rows

    cfg = model.config
    engine = model.engine
    t0 = time.perf_counter()
    processed = [model.processor.process_image(im) for im in images]
    rows = [model.processor.token_ids(text, [p]) for p in processed]
    crops = [ImageCrops.create(cfg, p.crops, p.plan) for p in processed]
    marks: list[float] = []
    cache_len: list[int] = []

    def on_tokens(buffer, _start, _end):  # called (synchronously) after prefill, then after decoding
        marks.append(time.perf_counter())
        cache_len.append(buffer.shape[1])

    timed = engine.embeddings = _TimedEmbeddings(engine.embeddings)  # this run only (an instance attribute)
    try:
        tokens = generate_token_rows(model, rows, crops, max_new_tokens=new_tokens, stop_ids=(), pad_id=0,
                                     on_tokens=on_tokens)
    finally:
        del engine.embeddings  # back to the class's method
    decode_s = marks[-1] - marks[0]
    return {
        # preprocess: the host's work until the first device program: the processor (in the cold run, loading the
        # tokenizer too), the crops, and the pipeline's batch prep and sampler / PRNG key / stop ids setup
        "ttft_s": marks[0] - t0, "preprocess_s": timed.start - t0, "vision_s": timed.end - timed.start,
        "prefill_s": marks[0] - timed.end, "decode_s": decode_s, "decode_tok_s": decode_rate(new_tokens, decode_s),
        "tokens": [list(map(int, r)) for r in tokens], "prompt_tokens": len(rows[0]),
        "image_tokens": int(np.sum(np.asarray(rows[0]) == cfg.image_token_id)),
        "crops": int(crops[0].crops.shape[0]), "prompt_bucket": timed.prompt_bucket, "cache_len": int(cache_len[0]),
        "input_ids_crc": zlib.crc32(np.asarray(rows[0], np.int64).tobytes()),
    }


def load_model(opts: dict):
    """`llava_jax.load` as the benchmark times it (until every param is in place); the model and `timed_load`'s
    figures, with the bytes of the params."""
    import jax

    import llava_jax

    def load():
        model = llava_jax.load(opts["model"], dtype=opts["dtype"], mesh=opts["mesh"], fsdp=opts["fsdp"],
                               kernels=opts.get("kernels"))
        jax.block_until_ready(model.params)
        return model

    model, loading = timed_load(load)
    loading["param_bytes"] = int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(model.params)))
    return model, loading


def load_only(opts: dict) -> dict:
    """Only the load (`llava-jax bench --load-only`): its time and memory."""
    import jax

    out = load_model(opts)[1]
    out["versions"] = {"jax": jax.__version__}
    return out


def run(opts: dict) -> dict:
    """Load the model, then a cold run and `repeats` warm ones; the side's results."""
    import jax

    if opts.get("compile_cache"):
        from ..xla_flags import enable_compilation_cache

        enable_compilation_cache()
    compile_log = CompileLog()
    model, loading = load_model(opts)
    images = [bench_image(tuple(opts["image_size"]), opts.get("image"))] * opts["batch"]
    runs = []
    for i in range(1 + opts["repeats"]):
        mark = compile_log.mark()
        result = run_once(model, opts["text"], images, opts["new_tokens"])
        result.update(compile_log.since(mark))
        runs.append(result)
        log(f"jax run {i}: ttft {result['ttft_s']:.2f} s (vision {result['vision_s']:.2f}, prefill "
            f"{result['prefill_s']:.2f}), decode {result['decode_tok_s']:.2f} tok/s, "
            f"{result['xla_compilations']} compilations")
    cold = runs[0]
    out = summarize_runs(runs)
    programs = {name: count for name, count in cold["programs"].items() if name in MODEL_PROGRAMS}
    out.update({
        **loading,
        "compile_s": cold["compile_s"],
        "xla_compile_s": cold["xla_compile_s"],
        "model_programs": programs,
        "all_programs": cold["programs"],
        "compiled_programs": sum(programs.values()),
        "xla_compilations": cold["xla_compilations"],
        "warm_compilations": sum(r["xla_compilations"] for r in runs[1:]),
        "persistent_cache": {"enabled": bool(jax.config.jax_compilation_cache_dir), "hits": compile_log.hits,
                             "misses": compile_log.misses},
        "peak_rss_gb": peak_rss_bytes() / 1e9,
        "tokens": cold["tokens"][0],
        "warm_tokens_equal": all(r["tokens"] == cold["tokens"] for r in runs[1:]),
    })
    for key in ("prompt_tokens", "image_tokens", "crops", "prompt_bucket", "cache_len", "input_ids_crc"):
        out[key] = cold[key]
    out["backend"] = jax.default_backend()
    out["device_kind"] = jax.devices()[0].device_kind
    out["read_per_token_bytes"] = text_weight_bytes(model.config, opts["dtype"])["read_per_token_bytes"]
    out["kernels"] = model.kernels
    out["mesh"] = dict(model.mesh.shape) if model.mesh is not None else None
    out["versions"] = {"jax": jax.__version__, "jaxlib": __import__("jaxlib").__version__}
    return out


def logits(opts: dict) -> dict:
    """fp32 logits of one image prompt (`opts["text"]`, one image), saved to `opts["out"]` (.npy): the llava-jax
    half of the device check's logits comparison."""
    import llava_jax

    model = llava_jax.load(opts["model"], dtype=opts["dtype"], kernels=opts.get("kernels"))
    image = bench_image(tuple(opts["image_size"]), opts.get("image"))
    inputs = model.processor(images=[image], text=opts["text"])
    out = model.forward(**inputs)
    np.save(opts["out"], out[0])
    return {"shape": list(out.shape), "kernels": model.kernels,
            "input_ids_crc": zlib.crc32(np.asarray(inputs["input_ids"][0], np.int64).tobytes())}
