"""The HTTP side: a Starlette app with OpenAI's chat-completions, models and a health endpoint.

    POST /v1/chat/completions   OpenAI's request and response (`stream: true`: server-sent events, one chunk per
                                group of tokens, then `data: [DONE]`)
    GET  /v1/models             the one served model
    GET  /health                {"status": "ok", slots, queue, compilations since warm-up}

Requests are checked (`protocol.py`), their images fetched and decoded (`images.py`) and tokenized off the event
loop, in Starlette's thread pool; the device work happens in the `Scheduler`'s thread. Every refusal is an
OpenAI-style JSON error, {"error": {"message", "type", "param", "code"}}: 400 for a bad request (malformed
JSON, wrong types, bad values, broken or oversized images, too many images, a prompt or max_tokens past the
context), 404 for an unknown model or path, 413 for a body over the limit, 429 when the queue is full, 504 when a
request runs past its timeout. A client that disconnects has its request cancelled and its slot freed.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import traceback
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..config import ConfigError
from ..errors import CheckpointError, InputError
from ..textgen import tokenize_with_images
from .images import ImagePolicy, load_image_url
from .protocol import ChatRequest, RequestError, parse_chat_request
from .scheduler import Job, QueueFullError, Scheduler, compilations, compiled_since


@dataclass(frozen=True)
class ServerLimits:
    """The limits of one server (see `llava-jax serve --help`)."""

    max_body_bytes: int = 32 << 20
    max_images: int = 8
    default_max_tokens: int = 256
    request_timeout_s: float = 300.0
    images: ImagePolicy = ImagePolicy()


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """An OpenAI-style error body."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class ChatServer:
    """The endpoints over one model and its scheduler."""

    def __init__(self, model, scheduler: Scheduler, model_id: str, template: str, limits: ServerLimits):
        self.model, self.scheduler, self.model_id = model, scheduler, model_id
        self.template, self.limits = template, limits
        self.created = int(time.time())

    # ---- endpoints ----
    async def health(self, _request: Request) -> JSONResponse:
        s = self.scheduler
        ok = s.error is None and s.thread is not None and s.thread.is_alive()
        body = {"status": "ok" if ok else "error", "model": self.model_id, "slots": len(s.slots),
                "busy_slots": s.busy_slots, "waiting": s.waiting, "max_queue": s.max_queue,
                "compilations_since_warm_up": compilations() - (s.compilations_after_warm_up or 0),
                "compiled_since_warm_up": compiled_since(s.compilations_after_warm_up or 0)[:20]}
        return JSONResponse(body, 200 if ok else 503)

    async def models(self, _request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "llava-jax"}]})

    async def chat_completions(self, request: Request):
        try:
            body = await self._read_json(request)
            chat = parse_chat_request(body)
            if chat.model is not None and chat.model != self.model_id:
                raise RequestError(f"the model {chat.model!r} does not exist; this server serves {self.model_id!r}",
                                   "model", "model_not_found", status=404)
            job, prompt_tokens = await run_in_threadpool(self._prepare, chat)
        except RequestError as e:
            return error_response(e.status, str(e), param=e.param, code=e.code)
        except (InputError, ConfigError, CheckpointError) as e:
            return error_response(400, " ".join(str(e).split()), code="invalid_value")
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.on_event = lambda event: _post(loop, events, event)
        try:
            self.scheduler.submit(job)
        except QueueFullError as e:
            return error_response(429, str(e), kind="rate_limit_error", code="queue_full")
        if self.scheduler.error is not None:
            job.cancel()
            return error_response(503, "the server failed and cannot take requests", kind="server_error")
        deadline = loop.time() + self.limits.request_timeout_s
        meta = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": self.model_id}
        if chat.stream:
            return StreamingResponse(self._stream(job, events, deadline, meta, prompt_tokens, chat.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._complete(request, job, events, deadline, meta, prompt_tokens)

    # ---- request preparation (thread pool) ----
    async def _read_json(self, request: Request):
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"the request body is {int(declared):,} bytes, more than the limit of {limit:,}",
                               None, "request_too_large", status=413)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise RequestError(f"the request body is more than the limit of {limit:,} bytes", None,
                                   "request_too_large", status=413)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}", None, "invalid_json") from e

    def _prepare(self, chat: ChatRequest) -> tuple[Job, int]:
        """Images fetched and decoded, the prompt rendered and tokenized, lengths checked: the `Job`."""
        limits = self.limits
        if len(chat.image_urls) > limits.max_images:
            raise RequestError(f"the request has {len(chat.image_urls)} images; this server accepts at most "
                               f"{limits.max_images}", "messages", "too_many_images")
        images = [load_image_url(url, limits.images) for url in chat.image_urls]
        ids, crops = tokenize_with_images(self.model, chat.prompt(self.template), images)
        s = self.scheduler
        if len(ids) > s.buckets[-1]:
            raise RequestError(f"the prompt is {len(ids)} tokens long (images included); this server takes prompts "
                               f"of at most {s.buckets[-1]} tokens (its context of {s.cache_len} is shared with the "
                               "answer)", "messages", "context_length_exceeded")
        room = s.room(len(ids))
        max_tokens = chat.max_tokens
        if max_tokens is None:
            max_tokens = min(limits.default_max_tokens, room)
        elif max_tokens > room:
            raise RequestError(f"max_tokens={max_tokens} is more than the {room} tokens this prompt leaves in the "
                               f"server's context of {s.cache_len} (prompt {len(ids)} tokens, padded to "
                               f"{s.bucket(len(ids))})", "max_tokens", "context_length_exceeded")
        seed = chat.seed if chat.seed is not None else secrets.randbelow(2**31)
        job = Job(ids, crops, max_tokens, chat.temperature, chat.top_p, seed, chat.stop, on_event=_post_nowhere)
        return job, len(ids)

    # ---- responses ----
    async def _complete(self, request: Request, job: Job, events: asyncio.Queue, deadline: float, meta: dict,
                        prompt_tokens: int) -> JSONResponse:
        pieces = []
        loop = asyncio.get_running_loop()
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    job.cancel()
                    return error_response(504, f"the request took longer than {self.limits.request_timeout_s:g} s",
                                          kind="timeout_error", code="timeout")
                try:
                    event = await asyncio.wait_for(events.get(), timeout=min(left, 0.5))
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return error_response(499, "the client disconnected")
                    continue
                if "delta" in event:
                    pieces.append(event["delta"])
                elif "error" in event:
                    status = event["status"]
                    return error_response(status, event["error"],
                                          kind="invalid_request_error" if status < 500 else "server_error")
                else:
                    break
        except asyncio.CancelledError:
            job.cancel()
            raise
        usage = _usage(prompt_tokens, event["completion_tokens"])
        return JSONResponse({**meta, "object": "chat.completion", "system_fingerprint": None, "choices": [{
            "index": 0, "message": {"role": "assistant", "content": "".join(pieces)}, "logprobs": None,
            "finish_reason": event["finish"]}], "usage": usage})

    async def _stream(self, job: Job, events: asyncio.Queue, deadline: float, meta: dict, prompt_tokens: int,
                      include_usage: bool):
        loop = asyncio.get_running_loop()

        def chunk(delta: dict, finish=None, **extra) -> str:
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            return "data: " + json.dumps({**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
                                          "choices": choices, **extra}) + "\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                left = deadline - loop.time()
                try:
                    if left <= 0:
                        raise TimeoutError
                    event = await asyncio.wait_for(events.get(), timeout=left)
                except TimeoutError:
                    job.cancel()
                    yield "data: " + json.dumps({"error": {"message": "the request took longer than "
                                                           f"{self.limits.request_timeout_s:g} s",
                                                           "type": "timeout_error", "param": None,
                                                           "code": "timeout"}}) + "\n\n"
                    break
                texts = []
                while "delta" in event:  # everything produced so far goes out as one chunk
                    texts.append(event["delta"])
                    if events.empty():
                        event = None
                        break
                    event = events.get_nowait()
                if texts:
                    yield chunk({"content": "".join(texts)})
                if event is None:
                    continue
                if "error" in event:
                    yield "data: " + json.dumps({"error": {"message": event["error"], "type": "invalid_request_error",
                                                           "param": None, "code": None}}) + "\n\n"
                    break
                yield chunk({}, event["finish"])
                if include_usage:
                    usage = _usage(prompt_tokens, event["completion_tokens"])
                    yield "data: " + json.dumps({**meta, "object": "chat.completion.chunk",
                                                 "system_fingerprint": None, "choices": [], "usage": usage}) + "\n\n"
                break
            yield "data: [DONE]\n\n"
        finally:  # finished, or the client went away (the generator is closed): the slot is freed
            job.cancel()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _post(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, event: dict) -> None:
    """From the scheduler thread into the request's queue on the event loop."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, event)
    except RuntimeError:  # the loop is closed: the server is shutting down
        pass


def _post_nowhere(_event: dict) -> None:
    pass


def build_app(server: ChatServer) -> Starlette:
    """The ASGI app; every error, unknown paths and methods included, is an OpenAI-style JSON body."""

    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind=kind)

    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        traceback.print_exception(exc)
        return error_response(500, f"internal error: {type(exc).__name__}", kind="server_error")

    routes = [Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
              Route("/v1/models", server.models, methods=["GET"]),
              Route("/health", server.health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error})


def model_id_for(path: str | None) -> str:
    """The served model's id: the checkpoint directory's name, or the default model's."""
    return "llava-jax-default" if path is None else os.path.basename(os.path.normpath(path))
