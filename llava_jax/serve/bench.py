"""`llava-jax bench-serve`: the server under 1, 4, 16 ... concurrent clients against the same requests run one
after another with `generate`.

The server runs in this process (uvicorn on a background thread, loopback only), warmed up first; the clients
are asyncio tasks with one httpx connection each, every request greedy with the same `max_tokens`, different
prompts. Reported per level: completion tokens/s over the wall time of all requests, and the p50 / p99 request
latency. The baseline: the same prompts (and images) through `model.generate`, one after another, after one
untimed call that compiles its programs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time

import numpy as np

from .scheduler import compiled_since
from .server import BackgroundServer, create_server

SUBJECTS = ["the picture", "the colors", "the animal", "the background", "the light", "the mood", "the shapes",
            "the textures"]
QUESTIONS = ["Describe {}.", "What can you say about {}?", "Write a short poem about {}.", "Explain {} to a child."]


def bench_prompts(n: int) -> list[str]:
    """n different prompts."""
    return [f"{QUESTIONS[i % len(QUESTIONS)].format(SUBJECTS[(i // len(QUESTIONS)) % len(SUBJECTS)])} (#{i})"
            for i in range(n)]


def _example_image():
    from importlib.resources import files

    from ..image import load_image

    return load_image(str(files("llava_jax") / "assets" / "cat.jpg"))


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(model_id: str, prompt: str, image_url: str | None, max_tokens: int) -> dict:
    content = [{"type": "text", "text": prompt}]
    if image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    return {"model": model_id, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}


async def _run_level(url: str, bodies: list[dict], clients: int) -> dict:
    import httpx

    pending = list(range(len(bodies)))
    latencies, tokens = [], []

    async def client(http):
        while pending:
            body = bodies[pending.pop(0)]
            start = time.perf_counter()
            response = await http.post(url + "/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            tokens.append(response.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(bodies), "completion_tokens": int(sum(tokens)), "wall_s": wall,
            "tokens_per_s": sum(tokens) / wall, "p50_latency_s": float(np.percentile(latencies, 50)),
            "p99_latency_s": float(np.percentile(latencies, 99))}


def _sequential(model, prompts: list[str], image, max_tokens: int) -> dict:
    images = None if image is None else [image]
    model.generate(prompts[0], images=images, max_new_tokens=max_tokens)  # compiles
    tokens, start = 0, time.perf_counter()
    for prompt in prompts:
        _, ids = model.generate(prompt, images=images, max_new_tokens=max_tokens, return_ids=True)
        tokens += len(ids)
    wall = time.perf_counter() - start
    return {"requests": len(prompts), "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def run_bench_serve(model, model_id: str, *, clients: list[int], requests: int, max_tokens: int, max_batch: int,
                    max_queue: int, context: int | None, buckets: list[int] | None, steps_per_call: int,
                    template: str | None, image: bool, log) -> dict:
    """Measure every concurrency level, then the sequential baseline; the results as a dict."""
    picture = _example_image() if image else None
    prompts = bench_prompts(requests)
    url = None if picture is None else data_url(picture)
    bodies = [chat_body(model_id, p, url, max_tokens) for p in prompts]
    server = create_server(model, model_id=model_id, max_batch=max_batch, max_queue=max(max_queue, requests),
                           context=context, buckets=buckets, steps_per_call=steps_per_call, template=template,
                           log=log)
    levels = []
    with BackgroundServer(server) as running:
        for c in clients:
            log(f"{c} concurrent clients, {requests} requests")
            levels.append(asyncio.run(_run_level(running.url, bodies, c)))
        under_load = compiled_since(server.scheduler.compilations_after_warm_up)
    log("the same requests one after another with generate")
    sequential = _sequential(model, prompts, picture, max_tokens)
    for level in levels:
        level["speedup_vs_sequential"] = level["tokens_per_s"] / sequential["tokens_per_s"]
    return {"model": model_id, "dtype": str(np.dtype(model.dtype)), "max_batch": max_batch,
            "steps_per_call": steps_per_call, "max_tokens": max_tokens,
            "image": image, "levels": levels, "sequential_generate": sequential,
            "server_compiled_under_load": under_load}


def print_table(result: dict) -> str:
    """The results as a small text table."""
    lines = [f"model {result['model']} ({result['dtype']}), max_batch {result['max_batch']}, "
             f"max_tokens {result['max_tokens']}, image {result['image']}",
             f"{'clients':>8} {'requests':>8} {'tokens':>7} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} {'vs seq':>7}"]
    for lv in result["levels"]:
        lines.append(f"{lv['clients']:>8} {lv['requests']:>8} {lv['completion_tokens']:>7} {lv['tokens_per_s']:>8.1f} "
                     f"{lv['p50_latency_s']:>7.2f} {lv['p99_latency_s']:>7.2f} {lv['speedup_vs_sequential']:>6.2f}x")
    seq = result["sequential_generate"]
    lines.append(f"{'generate':>8} {seq['requests']:>8} {seq['completion_tokens']:>7} {seq['tokens_per_s']:>8.1f}"
                 "   (one after another)")
    return "\n".join(lines)
