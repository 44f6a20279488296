"""Putting a server together: the scheduler (warmed up), the app, and uvicorn, in the foreground
(`llava-jax serve`) or on a background thread (`BackgroundServer`: tests and `bench-serve`)."""

from __future__ import annotations

import socket
import threading
import time

from ..prompt import default_template
from .app import ChatServer, ServerLimits, build_app
from .scheduler import Scheduler

DEFAULT_CONTEXT = 4096


def server_context(model, context: int | None) -> int:
    """Cache entries per slot: `context`, or the model's context up to `DEFAULT_CONTEXT`."""
    limit = model.config.text.max_position_embeddings
    if context is None:
        return min(limit, DEFAULT_CONTEXT)
    if context < 2 or context > limit:
        from ..errors import InputError

        raise InputError(f"--context must be between 2 and the model's context of {limit}, got {context}")
    return context


def create_server(model, *, model_id: str, max_batch: int = 16, max_queue: int = 64, context: int | None = None,
                  buckets: list[int] | None = None, steps_per_call: int = 4, template: str | None = None,
                  limits: ServerLimits | None = None, warm_up: bool = True,
                  log=None) -> ChatServer:
    """A `ChatServer` whose scheduler is running (every program compiled first when `warm_up`)."""
    scheduler = Scheduler(model, max_batch=max_batch, max_queue=max_queue, cache_len=server_context(model, context),
                          buckets=buckets, steps_per_call=steps_per_call)
    start = time.perf_counter()
    scheduler.start(warm_up=warm_up, log=log)
    if log is not None:
        log(f"ready: {max_batch} slots of {scheduler.cache_len} tokens, prompt buckets {scheduler.buckets}, "
            f"warm-up {time.perf_counter() - start:.1f} s")
    return ChatServer(model, scheduler, model_id, template or default_template(model.config),
                      limits or ServerLimits())


class BackgroundServer:
    """uvicorn serving `server` on a background thread, on `host` and a free port (or `port`); a context
    manager. `url` is its base URL (`http://127.0.0.1:PORT`)."""

    def __init__(self, server: ChatServer, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = server
        self.socket = socket.create_server((host, port))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(build_app(server), log_level="warning", lifespan="off", timeout_keep_alive=30)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        self.server.scheduler.stop()
        self.socket.close()
