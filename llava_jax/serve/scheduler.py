"""The serving loop: one thread that keeps the static-shape decode batch (`slots.SlotEngine`) full.

Each turn of the loop: admit waiting requests into free slots (each prefilled alone by its prompt bucket's
program, its images through the per-pinpoint vision programs, then inserted into its slot), dispatch one decode
call of every slot (`steps_per_call` tokens), and, while the device computes it, hand the previous call's tokens
to their requests, one group per request (detokenized with stop strings by `TextStreamer`). A request that finishes (stop token, stop string, token
budget) or is cancelled (its client went away, or it timed out) frees its slot at once.

Every program the loop runs is compiled by `warm_up`: one prefill (and embed) per prompt bucket, one vision
program per (AnyRes pinpoint, bucket), one insert, one step. A prompt is left-padded to its bucket in the slot's
cache, so the answer has the cache entries past the bucket (`room`). After it, serving compiles nothing; `compilations`
counts XLA compilations in this process, so that this can be checked (`/health` reports it).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import numpy as np

from ..batch import ImageCrops, left_pad, make_batch
from ..engine import stop_id_array
from ..errors import InputError
from ..sampling import make_sampler
from ..slots import SlotEngine
from ..textgen import TextStreamer, default_stop_ids


class QueueFullError(Exception):
    """The request queue holds `max_queue` requests already."""


_COMPILED: list[str] = []  # the name of every program XLA compiled in this process, in order


def _count_compilation(event: str, _secs: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILED.append(str(kwargs.get("fun_name", "?")))


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


def compilations() -> int:
    """XLA compilations in this process so far (persistent-cache hits included: they still load a program)."""
    return len(_COMPILED)


def compiled_since(count: int) -> list[str]:
    """The names of the programs compiled after the first `count` compilations."""
    return _COMPILED[count:]


def prompt_buckets(cache_len: int, minimum: int = 64) -> list[int]:
    """The server's default prompt lengths for a cache of `cache_len` entries: powers of two from `minimum` up to
    half the cache, then 5/8, 6/8 and 7/8 of it (so that a long prompt, a LLaVA-NeXT image, fits with at least
    an eighth of the cache left for its answer). Fewer and coarser than `batch.prompt_bucket`'s, so that warming
    every one up stays short."""
    buckets, b = [], minimum
    while b <= cache_len // 2:
        buckets.append(b)
        b *= 2
    for eighths in (5, 6, 7):
        b = cache_len * eighths // 8 // 8 * 8
        if b > (buckets[-1] if buckets else 0):
            buckets.append(b)
    return buckets


@dataclass(eq=False)
class Job:
    """One chat completion request, as the scheduler runs it. `on_event` is called from the scheduler thread
    with {"delta": text} as text is produced, then {"finish": reason, "completion_tokens": n} (reason "stop" or
    "length") or {"error": message, "status": HTTP status}."""

    prompt_ids: list[int]
    images: list[ImageCrops]
    max_new: int
    temperature: float
    top_p: float | None
    seed: int
    stop_strings: list[str]
    on_event: Callable[[dict], None]
    cancelled: bool = False
    finished: bool = False
    tokens: list[int] = field(default_factory=list)
    streamer: TextStreamer | None = None

    def cancel(self) -> None:
        """Free the request's slot (or drop it from the queue) at the scheduler's next turn."""
        self.cancelled = True


class Scheduler:
    """Continuous batching over `max_batch` slots of `cache_len` cache entries each; `max_queue` requests wait
    at most (more: `QueueFullError`)."""

    def __init__(self, model, *, max_batch: int = 16, max_queue: int = 64, cache_len: int = 4096,
                 buckets: list[int] | None = None, steps_per_call: int = 4):
        self.model, self.engine = model, model.engine
        self.cache_len, self.max_queue = cache_len, max_queue
        self.slot_engine = SlotEngine(self.engine, max_batch, cache_len, model.dtype, steps_per_call)
        self.buckets = sorted(set(buckets)) if buckets else prompt_buckets(cache_len)
        if not self.buckets or self.buckets[0] < 1 or self.buckets[-1] >= cache_len:
            raise InputError(f"prompt buckets must be between 1 and the context ({cache_len}) - 1, got {self.buckets}")
        self.stop_ids = default_stop_ids(model)
        self.stop_array = stop_id_array(self.stop_ids)
        self.pad_id = np.int32(getattr(model.tokenizer, "pad_token_id", None) or 0)
        self.decode_params = self.engine.params_for(model.params, "decode")
        self.slots: list[Job | None] = [None] * max_batch
        self.queue: collections.deque[Job] = collections.deque()
        self.wake = threading.Condition()
        self.state = None
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.compilations_after_warm_up: int | None = None
        self.error: BaseException | None = None

    # ---- the requests' side (any thread) ----
    def bucket(self, length: int) -> int:
        """The prompt bucket of a prompt of `length` tokens (InputError if none holds it)."""
        for b in self.buckets:
            if length <= b:
                return b
        raise InputError(f"the prompt is {length} tokens long; this server takes prompts of at most "
                         f"{self.buckets[-1]} tokens (its context is {self.cache_len}, shared with the answer)")

    def room(self, length: int) -> int:
        """How many tokens a prompt of `length` tokens leaves for the answer (its bucket + answer <= cache)."""
        return self.cache_len - self.bucket(length)

    def submit(self, job: Job) -> None:
        """Queue a request; `QueueFullError` if `max_queue` are waiting already."""
        with self.wake:
            if len(self.queue) >= self.max_queue:
                raise QueueFullError(f"the server is busy: {len(self.queue)} requests are waiting; retry later")
            self.queue.append(job)
            self.wake.notify()

    @property
    def busy_slots(self) -> int:
        return sum(job is not None for job in self.slots)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    # ---- life cycle ----
    def start(self, warm_up: bool = True, log: Callable[[str], None] | None = None) -> None:
        """Compile every program (`warm_up`), then start the loop thread."""
        self.state = self.slot_engine.empty()
        if warm_up:
            self.warm_up(log)
        self.compilations_after_warm_up = compilations()
        self.thread = threading.Thread(target=self._run, name="llava-jax-scheduler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def warm_up(self, log: Callable[[str], None] | None = None) -> None:
        """Run every program once on dummy requests: each bucket text-only, and each bucket with an image of
        each AnyRes pinpoint that fits in it."""
        cfg = self.model.config
        images = self._dummy_images()
        min_features = cfg.tokens_per_crop
        jobs = []
        for b in self.buckets:
            jobs.append(Job([1] * b, [], 2, 0.0, None, 0, [], _ignore))
            for image in images if b > min_features else []:
                features = min(image.num_features, b - 1)
                crops = ImageCrops(image.crops, image.feature_index[:features], image.padded_length)
                ids = [cfg.image_token_id] * features + [1] * (b - features)
                jobs.append(Job(ids, [crops], 2, 0.7, 0.9, 0, [], _ignore))
        # once more the first: every program then also runs on a state that `step` returned, not `empty`
        jobs.append(Job([1] * self.buckets[0], [], 2, 0.0, None, 0, [], _ignore))
        for i, job in enumerate(jobs):
            if log is not None and i % 8 == 0:
                log(f"warm-up {i + 1}/{len(jobs)}")
            self._admit_one(job, 0)
            self.state, tokens, done = self.slot_engine.step(self.decode_params, self.state, self.pad_id)
            np.asarray(tokens), np.asarray(done)
            self.slots[0] = None

    def _dummy_images(self) -> list[ImageCrops]:
        """One image of each vision program's shape: per AnyRes pinpoint (one for LLaVA-1.5)."""
        cfg, size = self.model.config, self.model.config.vision.image_size
        sizes = [(size, size)] if cfg.model_type == "llava" else [tuple(p) for p in cfg.image_grid_pinpoints]
        seen, out = set(), []
        for h, w in sizes:
            plan = self.model.plan_image(h, w)
            crops = np.zeros((1 if plan is None else plan.num_crops, 3, size, size), np.float32)
            image = ImageCrops.create(cfg, crops, plan)
            if (len(image.crops), image.padded_length) not in seen:
                seen.add((len(image.crops), image.padded_length))
                out.append(image)
        return out

    # ---- the loop (scheduler thread) ----
    def _run(self) -> None:
        inflight = None  # the step dispatched last: (tokens, done, the jobs in its slots)
        try:
            while not self.stopping:
                self._admit()
                dispatched = None
                if any(job is not None for job in self.slots):
                    self.state, tokens, done = self.slot_engine.step(self.decode_params, self.state, self.pad_id)
                    dispatched = (tokens, done, list(self.slots))
                if inflight is not None:  # the host's part of the last step, while the device runs this one
                    self._deliver(*inflight)
                inflight = dispatched
                if inflight is None:
                    with self.wake:
                        if not self.queue and not self.stopping:
                            self.wake.wait(timeout=0.1)
        except BaseException as e:  # the device failed: every request gets an error, new ones are refused
            self.error = e
            for job in [*self.slots, *self.queue]:
                if job is not None and not job.finished:
                    job.finished = True
                    job.on_event({"error": f"the server failed: {e}", "status": 500})
            raise

    def _admit(self) -> None:
        for slot, occupant in enumerate(self.slots):
            if occupant is not None:
                continue
            while True:
                with self.wake:
                    job = self.queue.popleft() if self.queue else None
                if job is None:
                    return
                if job.cancelled:
                    continue
                try:
                    self._admit_one(job, slot)
                except InputError as e:
                    job.finished = True
                    job.on_event({"error": str(e), "status": 400})
                    continue
                break

    def _admit_one(self, job: Job, slot: int) -> None:
        """Prefill `job` alone and insert it into `slot`; its first token is handed over at once."""
        ids, mask = left_pad([job.prompt_ids], self.bucket(len(job.prompt_ids)))
        batch = make_batch(ids, mask, job.images, self.model.config.image_token_id, self.engine.data_size)
        self.state, first = self.slot_engine.admit(self.state, self.model.params, batch, slot,
                                                   make_sampler(job.temperature, None, job.top_p), self.stop_array,
                                                   job.max_new, job.seed)
        job.streamer = TextStreamer(self.model.tokenizer, 1, job.stop_strings, self.stop_ids,
                                    lambda _row, text: job.on_event({"delta": text}))
        self.slots[slot] = job
        self._feed(slot, job, [int(np.asarray(first.tokens)[0, 0])])

    def _deliver(self, tokens, done, jobs: list[Job | None]) -> None:
        tokens = np.asarray(tokens)
        for slot, job in enumerate(jobs):
            if job is None or job.finished:
                continue
            if job.cancelled:
                job.finished = True
                self._free(slot, job)
                continue
            self._feed(slot, job, tokens[slot].tolist())

    def _feed(self, slot: int, job: Job, tokens: list[int]) -> None:
        """New tokens of `job`: text out (one delta for the group), and the end of the request if it is one."""
        new = []
        for token in tokens[: job.max_new - len(job.tokens)]:
            new.append(token)
            if token in self.stop_ids:
                break
        job.tokens += new
        hit_stop_string = bool(job.streamer(np.asarray([new]), 0, len(new))[0])
        if (new and new[-1] in self.stop_ids) or hit_stop_string:
            self._finish(slot, job, "stop")
        elif len(job.tokens) >= job.max_new:
            self._finish(slot, job, "length")

    def _finish(self, slot: int, job: Job, reason: str) -> None:
        job.streamer.flush(0)
        job.finished = True
        self._free(slot, job)
        job.on_event({"finish": reason, "completion_tokens": len(job.tokens)})

    def _free(self, slot: int, job: Job) -> None:
        if self.slots[slot] is job:
            self.slots[slot] = None


def _ignore(_event: dict) -> None:
    pass
