"""Text generation with onnxruntime: one model file, continuous batching. Never imports torch.

Background workers ("lanes") each own a copy of the model (bot.runner.ModelRunner) and a batch. Each
request is primed alone (its whole prompt in one call), then joins the batch of the lane that took it.
A batch advances CHUNK characters per call of the chunk graph (bot.chunk_graph), which samples and
steps in onnxruntime without coming back to Python; between calls, finished requests leave and new
ones join. Lane 0 takes requests until it holds its share of max_batch and hands the rest to the next
lane with room. onnxruntime releases the GIL while it runs, so on a CPU the lanes' graphs run on
separate cores at once: many requests gain a core, while a few still share one batch (docs/bench).

Every request samples with its own temperature, top-k and uniforms (drawn from its own numpy Generator),
and a row's logits do not depend on its batch mates (fp32: same kernels per row; int8: exact integer
matmuls with fixed activation scales), so a seed gives the same text alone or in a batch of any size,
in any lane.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bot.engine_api import MAX_LANES, EngineBusy, EngineClosed
from bot.modelfile import DEFAULT_MODEL_PATH
from bot.runner import ModelRunner
from model.text import CleaningOptions, Vocab, normalize_prompt

log = logging.getLogger(__name__)

TEMPERATURE_MAX = 2.0
MAX_LENGTH = 20_000
MAX_PROMPT_CHARS = 20_000
SENTENCE_ENDERS = frozenset(".!?")
# The greedy walk from a newline to the first sentence end, done once at load (see paragraph_start).
PARAGRAPH_START_MAX_CHARS = 300
# Characters per call of the chunk graph: also the streamed chunk, how long a new request may wait
# to join a running batch, and how often a cancelled request is noticed. Python's work per call is
# spread over these characters (16, 32 and 64 measured alike within this VM's noise, README "Speed").
CHUNK = 16
_STOP = object()
# Two lanes of 32 rows measured faster than one of 64, two of 4 slower than one of 8 (README, Speed).
MIN_LANE_BATCH = 32


def default_lanes(provider: str, threads: int | None, max_batch: int) -> int:
    """One lane per core on CPU (counting each lane's onnxruntime threads), as long as each lane's share
    of max_batch stays at least MIN_LANE_BATCH rows; one on a GPU, which batches within one graph call."""
    if provider != "CPUExecutionProvider":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_LANES, cores // (threads or 1), max_batch // MIN_LANE_BATCH))


class InvalidTemperature(ValueError):
    pass


class InvalidLength(ValueError):
    pass


class InvalidTopK(ValueError):
    pass


class InvalidSeed(ValueError):
    pass


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    length: int
    temperature: float
    top_k: int  # 0: no limit
    # One per character, drawn when the request is made (off the lanes' threads), padded to whole chunks
    # because a request ending mid-chunk is stepped to the chunk's end with the rest of its batch. At most
    # 80 KB (MAX_LENGTH float32s); drawing 16 per call from each Generator cost ~2 µs per row and call.
    uniforms: np.ndarray
    stop_at_sentence_end: bool
    # Called from the worker with a text chunk, then once with None (done) or an exception.
    deliver: Callable[[str | BaseException | None], None]
    streaming: bool  # deliver chunks as they come, not only the whole text at the end
    unread: list[np.ndarray] = field(default_factory=list)  # tokens not decoded yet
    unsent: list[str] = field(default_factory=list)
    ended_a_sentence: bool = False  # some text up to a sentence end was already delivered
    cancelled: bool = False

    def send(self, item: str | BaseException | None) -> None:
        """Hand an item to the caller; a caller that has gone away (closed event loop) only loses its request."""
        try:
            self.deliver(item)
        except Exception:
            log.warning("a caller stopped listening; its request is dropped", exc_info=True)
            self.cancelled = True

    def add(self, tokens: np.ndarray, final: bool, vocab: Vocab) -> None:
        """Take the next tokens and pass on what the caller may see now (then None if final). For a caller
        of the whole text, the worker only appends to `unread` until the last chunk, decoded once."""
        self.unread.append(tokens)
        pending = "".join(self.unsent) + vocab.decode(np.concatenate(self.unread).tolist())
        self.unread.clear()
        self.unsent.clear()
        if self.stop_at_sentence_end:
            end = max(pending.rfind(ch) for ch in SENTENCE_ENDERS) + 1
            if end:
                self.ended_a_sentence = True
            elif final and not self.ended_a_sentence:
                end = len(pending)  # no sentence ended at all: all of it
            if not final:
                self.unsent.append(pending[end:])
            pending = pending[:end]
        if pending:
            self.send(pending)
        if final:
            self.send(None)


@dataclass
class _Batch:
    """The requests stepped together and their rows: next-character logits, recurrent state, settings."""

    requests: list[_Request]
    logits: np.ndarray  # [batch, vocab]
    state: list[np.ndarray]  # each [layers, batch, hidden]
    temperatures: np.ndarray
    top_ks: np.ndarray  # 0 for rows without a limit
    remaining: np.ndarray  # characters each request still has to make

    ROWS = ("logits", "temperatures", "top_ks", "remaining")

    @classmethod
    def of(cls, joined: dict[_Request, tuple[np.ndarray, list[np.ndarray]]]) -> _Batch:
        requests = list(joined)
        return cls(
            requests,
            np.stack([logits for logits, _ in joined.values()]) if joined else np.zeros((0, 0), np.float32),
            [np.concatenate(parts, axis=1) for parts in zip(*(state for _, state in joined.values()), strict=True)],
            temperatures=np.array([r.temperature for r in requests], np.float32),
            top_ks=np.array([r.top_k for r in requests], np.int64),
            remaining=np.array([r.length for r in requests], np.int64),
        )

    def joined(self, other: _Batch) -> _Batch:
        if not self.requests:
            return other
        return _Batch(
            self.requests + other.requests,
            state=[np.concatenate([a, b], axis=1) for a, b in zip(self.state, other.state, strict=True)],
            **{name: np.concatenate([getattr(self, name), getattr(other, name)]) for name in self.ROWS},
        )

    def kept(self, keep: np.ndarray) -> _Batch:
        return _Batch(
            [r for r, k in zip(self.requests, keep, strict=True) if k],
            state=[s[:, keep] for s in self.state],
            **{name: getattr(self, name)[keep] for name in self.ROWS},
        )


def _settle(future: asyncio.Future, result: str | BaseException) -> None:
    if future.done():  # the caller was cancelled
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class GenerationEngine:
    """Thread-safe, asyncio-friendly text generation from one exported model file."""

    def __init__(
        self,
        model_path: str | Path = DEFAULT_MODEL_PATH,
        providers: str = "auto",
        threads: int | None = None,
        max_batch: int = 64,
        max_queue: int = 256,
        lanes: int | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be positive")
        if lanes is not None and not 1 <= lanes <= MAX_LANES:
            raise ValueError(f"lanes must be a whole number from 1 to {MAX_LANES}, not {lanes!r}")
        self.runner = ModelRunner(model_path, providers, threads)
        self.info, self.provider = self.runner.info, self.runner.provider
        lanes = min(lanes or default_lanes(self.provider, threads, max_batch), max_batch)
        runners = [self.runner] + [ModelRunner(model_path, providers, threads) for _ in range(lanes - 1)]
        self.vocab = Vocab(self.info.vocab, self.info.unknown_policy)
        self.cleaning = CleaningOptions.from_dict(self.info.cleaning)
        self.max_batch = max_batch
        self.lanes = lanes
        self._start_logits, self._start_state = self._paragraph_start()
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = False
        self.lane_peaks = [0] * lanes  # the most requests each lane has stepped together so far
        # Each lane holds at most its share of max_batch; lane 0 fills first (see _admit).
        self._lane_shares = [max_batch // lanes + (i < max_batch % lanes) for i in range(lanes)]
        self._lane_rows = [0] * lanes
        self._inboxes: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(lanes)]  # [0] unused
        self._workers = [
            threading.Thread(target=self._run, args=(i, runner), name=f"generation-lane-{i}", daemon=True)
            for i, runner in enumerate(runners)
        ]
        for worker in self._workers:
            worker.start()

    # ---- public API ----

    @property
    def capacity(self) -> int:
        """How many requests the engine holds at once, generating or waiting; one more is EngineBusy."""
        return self.max_batch + self._queue.maxsize

    @property
    def peak_batch(self) -> int:
        """The most requests that one lane has stepped together so far."""
        return max(self.lane_peaks)

    def stream(
        self,
        prompt: str = "",
        length: int = 500,
        temperature: float = 0.9,
        top_k: int | None = None,
        seed: int | None = None,
        stop_at_sentence_end: bool = False,
    ) -> Iterator[str]:
        """Chunks of the continuation of `prompt` (not including it) as they are produced."""
        chunks: queue.SimpleQueue = queue.SimpleQueue()
        request = self._submit(chunks.put, prompt, length, temperature, top_k, seed, stop_at_sentence_end)
        return self._drain(request, chunks)

    def generate(self, prompt: str = "", length: int = 500, **options) -> str:
        """The continuation of `prompt` (not including it); blocks until it is complete."""
        done = threading.Event()
        outcome: list[str | BaseException] = []
        request = self._collect(lambda result: (outcome.append(result), done.set()), prompt, length, **options)
        try:
            done.wait()
        finally:
            request.cancelled = True  # no effect once finished; stops the work if the wait was interrupted
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    async def agenerate(self, prompt: str = "", length: int = 500, **options) -> str:
        """generate() for asyncio: waits without holding a thread, so many requests can batch together."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        request = self._collect(
            lambda result: loop.call_soon_threadsafe(_settle, future, result), prompt, length, **options
        )
        try:
            return await future
        finally:
            request.cancelled = True

    async def astream(self, prompt: str = "", length: int = 500, **options) -> AsyncIterator[str]:
        """stream() for asyncio."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        request = self._submit(
            lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item), prompt, length, **options
        )
        try:
            while (item := await chunks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)  # lane 0 passes it on to the other lanes
        for worker in self._workers:
            worker.join()
        self._fail_waiting()

    def __enter__(self) -> GenerationEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- request handling (caller's thread) ----

    def _submit(
        self,
        deliver: Callable[[str | BaseException | None], None],
        prompt: str,
        length: int,
        temperature: float = 0.9,
        top_k: int | None = None,
        seed: int | None = None,
        stop_at_sentence_end: bool = False,
        streaming: bool = True,
    ) -> _Request:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, not {type(prompt).__name__}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_LENGTH:
            raise InvalidLength(f"length must be a whole number from 1 to {MAX_LENGTH}, not {length!r}")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not 0 < temperature <= TEMPERATURE_MAX
        ):
            raise InvalidTemperature(f"temperature must be above 0 and at most {TEMPERATURE_MAX}, not {temperature!r}")
        vocab_size = len(self.vocab)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise InvalidTopK(f"top_k must be a whole number from 1 to {vocab_size} (0 or None: off), not {top_k!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InvalidSeed(f"seed must be a non-negative whole number or None, not {seed!r}")
        if self._closed:
            raise EngineClosed("the generation engine is closed")
        request = _Request(
            prompt_ids=self.vocab.encode(normalize_prompt(prompt, self.cleaning)),
            length=length,
            temperature=float(temperature),
            top_k=top_k if top_k and top_k < vocab_size else 0,  # 0: no limit
            uniforms=np.random.default_rng(seed).random(-(-length // CHUNK) * CHUNK, np.float32),
            stop_at_sentence_end=stop_at_sentence_end,
            deliver=deliver,
            streaming=streaming,
        )
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise EngineBusy(
                f"the generation engine is busy ({self._queue.maxsize} requests waiting); try again in a moment"
            ) from None
        return request

    def _collect(self, on_done: Callable[[str | BaseException], None], prompt: str, length: int, **options) -> _Request:
        """Submit a request whose text is handed over once, when complete (no wake-ups per chunk)."""
        parts: list[str] = []

        def deliver(item: str | BaseException | None) -> None:
            if item is None:
                on_done("".join(parts))
            elif isinstance(item, BaseException):
                on_done(item)
            else:
                parts.append(item)

        return self._submit(deliver, prompt, length, streaming=False, **options)

    @staticmethod
    def _drain(request: _Request, chunks: queue.SimpleQueue) -> Iterator[str]:
        try:
            while (item := chunks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled = True

    # ---- the worker ----

    def _paragraph_start(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits and state at the end of the first sentence the model writes greedily after a newline.

        Training sees a zero state once an epoch, so text sampled straight from it starts oddly; this
        matches `python -m model sample`. It is deterministic, so it is computed once.
        """
        start = self.vocab.encode("\n")[:1] or [0]
        enders = set(self.vocab.encode("".join(SENTENCE_ENDERS)))
        breaks = set(self.vocab.encode(" ")) | set(start)
        logits, state = self.runner.prime(np.array([start], np.int64), self.runner.zero_state(1))
        previous = start[0]
        for _ in range(PARAGRAPH_START_MAX_CHARS):
            token = int(logits[0, -1].argmax())
            logits, state = self.runner.prime(np.array([[token]], np.int64), state)
            if token in breaks and previous in enders:
                break
            previous = token
        return logits[0, -1], state

    def _prime(self, runner: ModelRunner, request: _Request) -> tuple[np.ndarray, list[np.ndarray]]:
        """The request's next-character logits and its state after the prompt."""
        if not request.prompt_ids:
            return self._start_logits, self._start_state
        logits, state = runner.prime(np.array([request.prompt_ids], np.int64), self._start_state)
        return logits[0, -1], state

    def _run(self, lane: int, runner: ModelRunner) -> None:
        batch = _Batch.of({})
        stopping = False
        while not stopping or batch.requests:
            joined, stopping = self._admit(
                lane, runner, len(batch.requests), block=not batch.requests and not stopping, stopping=stopping
            )
            try:
                if joined:
                    batch = batch.joined(_Batch.of(joined))
                if not batch.requests:
                    continue
                self.lane_peaks[lane] = max(self.lane_peaks[lane], len(batch.requests))
                # A batch whose requests all end sooner takes fewer steps. The uniforms of a shorter chunk
                # are the first of a full one's, so a request's text does not depend on its batch mates.
                steps = min(CHUNK, int(batch.remaining.max()))
                starts = [r.length - left for r, left in zip(batch.requests, batch.remaining.tolist(), strict=True)]
                uniforms = np.array([r.uniforms[i : i + steps] for r, i in zip(batch.requests, starts, strict=True)])
                tokens, batch.logits, batch.state = runner.sample(
                    batch.logits, batch.state, batch.temperatures, batch.top_ks, uniforms
                )
                keep = self._deliver(batch, tokens)
                if not keep.all():
                    batch = batch.kept(keep)
                    self._lane_rows[lane] = len(batch.requests)
            except Exception as exc:  # a failed run must not kill the worker; fail the requests it held
                log.exception("generation step failed")
                for request in dict.fromkeys(batch.requests + list(joined)):
                    request.send(exc)
                batch = _Batch.of({})
                self._lane_rows[lane] = 0

    def _admit(self, lane: int, runner: ModelRunner, running: int, block: bool, stopping: bool) -> tuple[dict, bool]:
        """Prime waiting requests for this lane, up to its share of max_batch; blocks only when nothing runs.

        Lane 0 reads the engine's queue and hands a request to the next lane with room only when it is
        full itself; the other lanes take what they are handed. A few requests thus share one batch:
        two lanes stepping small batches side by side measured slower than one (with one call per
        character then, the GIL changed hands twice per step), while a full lane gains from a second core.
        """
        joined: dict[_Request, tuple[np.ndarray, list[np.ndarray]]] = {}
        source = self._queue if lane == 0 else self._inboxes[lane]
        while not stopping:
            target = lane if running + len(joined) < self._lane_shares[lane] else self._lane_with_room(lane)
            if target is None:
                break
            wait = block and not joined
            if not wait and source.empty():
                break  # the common case while a batch runs; cheaper than a get that raises
            try:
                request = source.get(block=wait)
            except queue.Empty:
                break
            if request is _STOP:
                stopping = True
                if lane == 0:  # after every request it handed on, so each lane finishes its own first
                    for inbox in self._inboxes[1:]:
                        inbox.put(_STOP)
            elif request.cancelled:
                continue
            elif target != lane:
                self._inboxes[target].put(request)
            else:
                try:
                    joined[request] = self._prime(runner, request)
                    self._lane_rows[lane] = running + len(joined)
                except Exception as exc:
                    log.exception("priming a prompt failed")
                    request.send(exc)
        return joined, stopping

    def _lane_with_room(self, lane: int) -> int | None:
        """For lane 0 when full: the first other lane with room for one more request (counting those handed
        to it and not yet taken)."""
        if lane != 0:
            return None
        for other in range(1, self.lanes):
            if self._lane_rows[other] + self._inboxes[other].qsize() < self._lane_shares[other]:
                return other
        return None

    def _deliver(self, batch: _Batch, tokens: np.ndarray) -> np.ndarray:
        """Hand each request its new tokens (the last chunk only up to its length); which go on."""
        steps = tokens.shape[1]
        for request, row_tokens, left in zip(batch.requests, tokens, batch.remaining.tolist(), strict=True):
            if left > steps and not request.streaming:
                request.unread.append(row_tokens)  # the common case, kept cheap: nothing to hand over yet
            elif not request.cancelled:
                request.add(row_tokens[:left], final=left <= steps, vocab=self.vocab)
        batch.remaining -= steps
        if any(request.cancelled for request in batch.requests):
            return np.array([not request.cancelled for request in batch.requests]) & (batch.remaining > 0)
        return batch.remaining > 0

    def _fail_waiting(self) -> None:
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request is not _STOP:
                request.send(EngineClosed("the generation engine was closed before this request ran"))
