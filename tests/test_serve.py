"""`llava-jax serve`: a live server on 127.0.0.1 (a free port), driven by the official `openai` client and httpx.

One server for the module: a small random-weight LLaVA-NeXT (the default model's recipe with 56-pixel crops and
two AnyRes pinpoints, so that its images are 16-60 tokens and warming up takes seconds), the real Mistral
tokenizer, 8 decode slots, a 256-entry cache and one prompt bucket (192): warm-up compiles one prefill, two
vision programs (one per pinpoint), insert and step.
"""

import asyncio
import base64
import copy
import dataclasses
import io
import json
import os
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

import llava_jax
from llava_jax.default_model import RANDOM_CONFIG
from llava_jax.prompt import mistral_tokenizer_dir, render_prompt
from llava_jax.random_checkpoint import write_random_checkpoint
from llava_jax.serve.app import ServerLimits
from llava_jax.serve.images import ImagePolicy, load_image_url
from llava_jax.serve.protocol import RequestError, parse_chat_request
from llava_jax.serve.scheduler import prompt_buckets
from llava_jax.serve.server import BackgroundServer, create_server

MODEL_ID = "tiny-serve"
SLOTS = 8


def png_data_url(height: int, width: int, seed: int) -> str:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = copy.deepcopy(RANDOM_CONFIG)
    config["vision_config"]["image_size"] = 56
    config["image_grid_pinpoints"] = [[56, 112], [112, 56]]
    path = tmp_path_factory.mktemp("serve") / MODEL_ID
    mistral_tokenizer_dir(path)
    write_random_checkpoint(path, config, "float32", seed=5)
    model = llava_jax.load(str(path))
    # small limits, so that the tests that pass them send little: 256 KB bodies, 100 KB images, 1 Mpixel
    limits = ServerLimits(max_body_bytes=256 << 10, images=ImagePolicy(max_image_bytes=100 << 10, max_pixels=10**6))
    chat = create_server(model, model_id=MODEL_ID, max_batch=SLOTS, max_queue=64, context=256, buckets=[192],
                         limits=limits)
    with BackgroundServer(chat) as running:
        running.chat = chat
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def user(text: str, *image_urls: str) -> list[dict]:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    return [{"role": "user", "content": parts}]


def request_set() -> list[dict]:
    """16 different greedy requests: text only, one image (both pinpoints, several sizes), two images, and two
    seeded sampled ones."""
    out = []
    for i in range(16):
        images = [] if i % 4 == 0 else [png_data_url(30 + 7 * i, 90 - 3 * i, seed=i)]
        if i == 5:
            images.append(png_data_url(80, 40, seed=99))
        body = {"model": MODEL_ID, "messages": user(f"Question {i}: what do you see?", *images), "max_tokens": 24,
                "temperature": 0}
        if i in (3, 10):
            body.update(temperature=0.8, top_p=0.9, seed=1000 + i)
        out.append(body)
    return out


async def post_all(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    """Every body posted, `concurrency` at a time; responses in the order of `bodies`."""
    results: list = [None] * len(bodies)
    todo = list(range(len(bodies)))

    async def worker(http):
        while todo:
            i = todo.pop(0)
            results[i] = await http.post(url + "/v1/chat/completions", json=bodies[i])

    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return results


def health(server) -> dict:
    response = httpx.get(server.url + "/health", timeout=10)
    assert response.status_code == 200
    return response.json()


# ---- the openai client -------------------------------------------------------------------------------------
def test_chat_completion_with_image_and_its_stream(client):
    messages = user("What is in this picture?", png_data_url(60, 130, seed=1))
    done = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20, temperature=0)
    text = done.choices[0].message.content
    assert done.choices[0].message.role == "assistant" and text
    assert done.choices[0].finish_reason in ("stop", "length")
    # the image alone is at least one 16-token crop; the answer's tokens are counted
    assert done.usage.prompt_tokens > 16 and 1 <= done.usage.completion_tokens <= 20
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 2  # really streamed, not one final chunk
    assert "".join(deltas) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == done.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    status = health(server)
    assert status["status"] == "ok" and status["slots"] == SLOTS


def test_multi_turn_with_several_images(client):
    messages = [{"role": "system", "content": "Be brief."},
                *user("Compare these.", png_data_url(40, 100, 2), png_data_url(100, 40, 3)),
                {"role": "assistant", "content": "They differ."}, *user("How?")]
    done = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0)
    assert done.choices[0].message.content


def test_stop_string_ends_the_answer(client):
    messages = user("Tell me a story.")
    free = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20, temperature=0)
    text = free.choices[0].message.content
    word = text.split()[2]
    cut = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20, temperature=0, stop=[word])
    assert cut.choices[0].message.content == text[: text.index(word)]
    assert cut.choices[0].finish_reason == "stop"


# ---- continuous batching ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alone(server):
    """Each request of `request_set` alone (one after another): the reference answers."""
    bodies = request_set()
    responses = asyncio.run(post_all(server.url, bodies, concurrency=1))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    texts = [r.json()["choices"][0]["message"]["content"] for r in responses]
    assert len(set(texts)) == len(texts)  # different answers: a swapped or duplicated answer would show
    return bodies, texts


def test_concurrent_requests_equal_each_alone(server, alone):
    bodies, texts = alone

    async def together():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        return await asyncio.gather(*(client.chat.completions.create(**body) for body in bodies))

    answers = asyncio.run(together())
    assert [a.choices[0].message.content for a in answers] == texts


def test_load_every_request_answered_once_then_malformed_burst(server, alone):
    bodies, texts = alone
    repeats = 2
    start = time.perf_counter()
    responses = asyncio.run(post_all(server.url, bodies * repeats, concurrency=12))
    took = time.perf_counter() - start
    assert [r.status_code for r in responses] == [200] * len(bodies) * repeats
    payloads = [r.json() for r in responses]
    assert len({p["id"] for p in payloads}) == len(payloads)
    assert [p["choices"][0]["message"]["content"] for p in payloads] == texts * repeats
    assert took < 100  # bounded in time: 32 requests of at most 24 tokens on 8 slots

    bad = bad_requests(server)
    got = asyncio.run(_send_raw(server.url, bad))
    for (name, _, want), response in zip(bad, got, strict=True):
        assert response.status_code == want, (name, response.status_code, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"], name
    good = asyncio.run(post_all(server.url, bodies[:1], concurrency=1))[0]
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == texts[0]
    status = health(server)
    assert status["status"] == "ok" and status["busy_slots"] == 0 and status["waiting"] == 0
    # the fixed set of programs: nothing compiled since warm-up, through every test so far
    assert status["compilations_since_warm_up"] == 0


def bad_requests(server) -> list[tuple[str, bytes | dict, int]]:
    """(what, body, expected status)."""
    ok = {"model": MODEL_ID, "messages": user("Hi"), "max_tokens": 4}
    huge = png_data_url(8, 8, 0).split(",")[0] + "," + base64.b64encode(b"\0" * (150 << 10)).decode()
    big_image = io.BytesIO()
    Image.new("RGB", (1200, 1000)).save(big_image, format="PNG")
    too_many_pixels = "data:image/png;base64," + base64.b64encode(big_image.getvalue()).decode()
    return [
        ("malformed json", b'{"model": "x", "messages": [', 400),
        ("not utf-8", b"\xff\xfe{", 400),
        ("a list body", b"[1, 2]", 400),
        ("messages not a list", {**ok, "messages": "hi"}, 400),
        ("no messages", {**ok, "messages": []}, 400),
        ("bad role", {**ok, "messages": [{"role": "robot", "content": "x"}]}, 400),
        ("empty user message", {**ok, "messages": [{"role": "user", "content": ""}]}, 400),
        ("ends with assistant", {**ok, "messages": [*user("a"), {"role": "assistant", "content": "b"}]}, 400),
        ("max_tokens a string", {**ok, "max_tokens": "10"}, 400),
        ("max_tokens zero", {**ok, "max_tokens": 0}, 400),
        ("max_tokens past the context", {**ok, "max_tokens": 100000}, 400),
        ("temperature nan", b'{"model": "tiny-serve", "messages": [{"role": "user", "content": "x"}], '
                            b'"temperature": NaN}', 400),
        ("temperature negative", {**ok, "temperature": -1}, 400),
        ("temperature a bool", {**ok, "temperature": True}, 400),
        ("top_p zero", {**ok, "top_p": 0}, 400),
        ("seed a float", {**ok, "seed": 1.5}, 400),
        ("empty stop", {**ok, "stop": [""]}, 400),
        ("n = 2", {**ok, "n": 2}, 400),
        ("stream a string", {**ok, "stream": "yes"}, 400),
        ("unknown model", {**ok, "model": "gpt-4"}, 404),
        ("unknown part type", {**ok, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400),
        ("broken image", {**ok, "messages": user("x", "data:image/png;base64," +
                                                 base64.b64encode(b"not a png").decode())}, 400),
        ("bad base64", {**ok, "messages": user("x", "data:image/png;base64,@@@@")}, 400),
        ("image past the byte limit", {**ok, "messages": user("x", huge)}, 400),
        ("image past the pixel limit", {**ok, "messages": user("x", too_many_pixels)}, 400),
        ("too many images", {**ok, "messages": user("x", *[png_data_url(20, 20, i) for i in range(9)])}, 400),
        ("prompt past the context", {**ok, "messages": user("word " * 300)}, 400),
        ("remote image (disabled)", {**ok, "messages": user("x", "http://127.0.0.1:9/cat.png")}, 400),
        ("local file (disabled)", {**ok, "messages": user("x", "/etc/passwd")}, 400),
        ("body past the limit", b"{" + b" " * (300 << 10) + b"}", 413),
    ]


async def _send_raw(url: str, cases) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as http:
        async def one(body):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            return await http.post(url + "/v1/chat/completions", content=data,
                                   headers={"Content-Type": "application/json"})

        return await asyncio.gather(*(one(body) for _, body, _ in cases))


# ---- backpressure, timeouts, disconnects ---------------------------------------------------------------------
def test_full_queue_is_429_never_a_hang(server):
    scheduler = server.chat.scheduler
    scheduler.max_queue = 1
    try:
        body = {"model": MODEL_ID, "messages": user("Count to ten."), "max_tokens": 30, "temperature": 0}
        responses = asyncio.run(post_all(server.url, [body] * 16, concurrency=16))
    finally:
        scheduler.max_queue = 64
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 1
    error = next(r for r in responses if r.status_code == 429).json()["error"]
    assert error["code"] == "queue_full"


def test_timeout_and_disconnect_free_their_slots(server):
    chat = server.chat
    limits = chat.limits
    chat.limits = dataclasses.replace(limits, request_timeout_s=0.2)
    try:
        body = {"model": MODEL_ID, "messages": user("Go on."), "max_tokens": 60, "temperature": 0}
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    finally:
        chat.limits = limits
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"

    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/chat/completions",
                                                       json={**body, "stream": True}) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")  # the stream started; now the client goes away
    deadline = time.monotonic() + 10
    while health(server)["busy_slots"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health(server)["busy_slots"] == 0


# ---- pieces, without a server ----------------------------------------------------------------------------------
def test_prompt_buckets_leave_room_for_answers():
    assert prompt_buckets(4096) == [64, 128, 256, 512, 1024, 2048, 2560, 3072, 3584]
    assert prompt_buckets(512) == [64, 128, 256, 320, 384, 448]


def test_messages_map_onto_the_template():
    body = {"messages": [{"role": "system", "content": "S"}, *user("one", "data:x", "data:y"),
                         {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"},
                         {"role": "user", "content": [{"type": "text", "text": "four"}]}]}
    chat = parse_chat_request(body)
    assert chat.image_urls == ["data:x", "data:y"]
    assert chat.prompt("vicuna_v1") == render_prompt("vicuna_v1", ["<image>\n<image>\none", "two", "three\nfour"],
                                                     system="S")
    with pytest.raises(RequestError, match="top_p must be"):
        parse_chat_request({**body, "top_p": 1.5})


def test_image_policy(tmp_path):
    allowed = tmp_path / "images"
    allowed.mkdir()
    Image.new("RGB", (10, 12)).save(allowed / "a.png")
    (tmp_path / "secret.png").write_bytes((allowed / "a.png").read_bytes())
    os.symlink(tmp_path / "secret.png", allowed / "link.png")
    policy = ImagePolicy(local_dir=str(allowed))
    assert load_image_url("a.png", policy).size == (10, 12)
    assert load_image_url(f"file://{allowed}/a.png", policy).size == (10, 12)
    for escape in ["../secret.png", str(tmp_path / "secret.png"), "link.png"]:
        with pytest.raises(llava_jax.InputError, match="outside the allowed directory"):
            load_image_url(escape, policy)
    with pytest.raises(llava_jax.InputError, match="disabled"):
        load_image_url("a.png", ImagePolicy())
    with pytest.raises(llava_jax.InputError, match="pixels"):
        load_image_url("a.png", dataclasses.replace(policy, max_pixels=100))
