"""Text generation with onnxruntime: one model file, continuous batching. Never imports torch.

Background workers ("lanes") each own a copy of the model (bot.runner.ModelRunner) and a batch. Each
request is primed alone (its whole prompt in one call), then joins the batch of the lane that took it,
which advances one character per call; a finished request leaves at once and a new one joins at the
next step. Lane 0 takes requests until it holds its share of max_batch and hands the rest to the next
lane with room. onnxruntime releases the GIL while it runs, so on a CPU the lanes' graphs run on
separate cores at once: many requests gain a core, while a few still share one batch (docs/bench).

Every request samples with its own temperature, top-k and numpy Generator, and a row's logits do not
depend on its batch mates (fp32: same kernels per row; int8: exact integer matmuls with fixed
activation scales), so a seed gives the same text alone or in a batch of any size, in any lane. The
per-step bookkeeping is vectorised over the batch (uniforms drawn in blocks per request, tokens
decoded every CHUNK_STEPS characters), so Python work per step barely grows with the number of
requests.
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

from bot.runner import DEFAULT_MODEL_PATH, ModelRunner
from model.text import CleaningOptions, Vocab, normalize_prompt

log = logging.getLogger(__name__)

TEMPERATURE_MAX = 2.0
MAX_LENGTH = 20_000
MAX_PROMPT_CHARS = 20_000
SENTENCE_ENDERS = frozenset(".!?")
# The greedy walk from a newline to the first sentence end, done once at load (see paragraph_start).
PARAGRAPH_START_MAX_CHARS = 300
CHUNK_STEPS = 16  # characters per streamed chunk; also how often a cancelled request is noticed
# Uniforms each request draws from its Generator at a time (a multiple of CHUNK_STEPS, so blocks are
# refilled when chunks are delivered). A block of draws is the same stream as single draws.
UNIFORM_BLOCK = 4 * CHUNK_STEPS
_STOP = object()
MAX_LANES = 8
# Two lanes of 32 rows measured faster than one of 64, two of 4 slower than one of 8 (README, Speed).
MIN_LANE_BATCH = 32


def default_lanes(provider: str, threads: int | None, max_batch: int) -> int:
    """One lane per core on CPU (counting each lane's onnxruntime threads), as long as each lane's share
    of max_batch stays at least MIN_LANE_BATCH rows; one on a GPU, which batches within one graph call."""
    if provider != "CPUExecutionProvider":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_LANES, cores // (threads or 1), max_batch // MIN_LANE_BATCH))


class EngineBusy(RuntimeError):
    """The request queue is full; try again later."""


class EngineClosed(RuntimeError):
    """The engine was closed before or while the request ran."""


class InvalidTemperature(ValueError):
    pass


class InvalidLength(ValueError):
    pass


class InvalidTopK(ValueError):
    pass


class InvalidSeed(ValueError):
    pass


def sample_rows(logits: np.ndarray, temperatures: np.ndarray, top_ks: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """One token per row by inverse-CDF sampling; each row uses only its own values.

    top_ks is None when no row has a top-k limit, else holds each row's k (the vocabulary size for
    rows without a limit); uniforms are in [0, 1). It runs once per step for the whole batch, in the
    logits' float32, with as few numpy calls as possible.
    """
    scores = (logits - logits.max(axis=1, keepdims=True)) / temperatures[:, None]
    if top_ks is not None:
        kth = -np.sort(-scores, axis=1)[np.arange(len(scores)), top_ks - 1]
        scores[scores < kth[:, None]] = -np.inf
    cdf = np.exp(scores).cumsum(axis=1)
    # u < 1 keeps the threshold below the total, so the count is at most vocab - 1.
    return (cdf < uniforms[:, None] * cdf[:, -1:]).sum(axis=1)


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    length: int
    temperature: float
    top_k: int
    rng: np.random.Generator
    stop_at_sentence_end: bool
    # Called from the worker with a text chunk, then once with None (done) or an exception.
    deliver: Callable[[str | BaseException | None], None]
    streaming: bool  # deliver chunks as they come, not only the whole text at the end
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

    def add(self, text: str, final: bool) -> None:
        """Take the next characters and pass on what the caller may see now (then None if final)."""
        self.unsent.append(text)
        if not (final or self.streaming):
            return
        pending = "".join(self.unsent)
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

    def uniforms(self, start: int) -> np.ndarray:
        """The next block of uniforms, rotated so that its first one sits at the batch's column for `start`."""
        return np.roll(self.rng.random(UNIFORM_BLOCK), start % UNIFORM_BLOCK)


@dataclass
class _Batch:
    """The requests stepped together and their rows: recurrent state, next input token, sampling settings.

    `step` counts the batch's steps. A request that joined at step `start` makes its k-th character at
    step start + k; its tokens and uniforms live in ring buffers indexed by the step, so a step
    reads and writes one column for all rows, and the rows are only looked at one by one at
    `next_event`, when some request has a chunk to deliver or is done.
    """

    requests: list[_Request]
    state: list[np.ndarray]  # each [layers, batch, hidden]
    step: int
    vocab_size: int
    tokens: np.ndarray
    temperatures: np.ndarray
    top_ks: np.ndarray  # vocab_size for rows without a limit
    lengths: np.ndarray
    starts: np.ndarray
    history: np.ndarray  # [batch, CHUNK_STEPS] tokens by step
    uniform_ring: np.ndarray  # [batch, UNIFORM_BLOCK] uniforms by step
    next_event: int = field(init=False)
    limited: bool = field(init=False)  # some row has a top-k limit

    ROWS = ("tokens", "temperatures", "top_ks", "lengths", "starts", "history", "uniform_ring")

    def __post_init__(self) -> None:
        self.limited = bool((self.top_ks < self.vocab_size).any())
        self.schedule()

    @classmethod
    def of(cls, requests: list[_Request], states: list[list[np.ndarray]], step: int, vocab_size: int) -> _Batch:
        n = len(requests)
        return cls(
            requests,
            [np.concatenate(parts, axis=1) for parts in zip(*states, strict=True)] if n else [],
            step,
            vocab_size,
            tokens=np.zeros(n, np.int64),
            temperatures=np.array([r.temperature for r in requests], np.float32),
            top_ks=np.array([r.top_k for r in requests], np.int64),
            lengths=np.array([r.length for r in requests], np.int64),
            starts=np.full(n, step, np.int64),
            history=np.zeros((n, CHUNK_STEPS), np.int64),
            uniform_ring=np.array([r.uniforms(step) for r in requests]).reshape(n, UNIFORM_BLOCK),
        )

    def joined(self, other: _Batch) -> _Batch:
        if not self.requests:
            return other
        return _Batch(
            self.requests + other.requests,
            [np.concatenate([a, b], axis=1) for a, b in zip(self.state, other.state, strict=True)],
            self.step,
            self.vocab_size,
            **{name: np.concatenate([getattr(self, name), getattr(other, name)]) for name in self.ROWS},
        )

    def kept(self, keep: np.ndarray) -> _Batch:
        return _Batch(
            [r for r, k in zip(self.requests, keep, strict=True) if k],
            [s[:, keep] for s in self.state],
            self.step,
            self.vocab_size,
            **{name: getattr(self, name)[keep] for name in self.ROWS},
        )

    def schedule(self) -> None:
        """The next step at which a request has a full chunk or is done."""
        made = self.step - self.starts
        until = np.minimum(CHUNK_STEPS - made % CHUNK_STEPS, self.lengths - made)
        self.next_event = self.step + int(until.min()) if len(until) else self.step

    def uniforms(self) -> np.ndarray:
        """The uniform for each row's next character, from its request's own Generator."""
        return self.uniform_ring[:, self.step % UNIFORM_BLOCK]


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
        fast_step: bool = True,
        lanes: int | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be positive")
        if lanes is not None and not 1 <= lanes <= MAX_LANES:
            raise ValueError(f"lanes must be a whole number from 1 to {MAX_LANES}, not {lanes!r}")
        self.runner = ModelRunner(model_path, providers, threads, fast_step)
        self.info, self.provider = self.runner.info, self.runner.provider
        lanes = min(lanes or default_lanes(self.provider, threads, max_batch), max_batch)
        runners = [self.runner] + [ModelRunner(model_path, providers, threads, fast_step) for _ in range(lanes - 1)]
        self.vocab = Vocab(self.info.vocab, self.info.unknown_policy)
        self.cleaning = CleaningOptions.from_dict(self.info.cleaning)
        self.max_batch = max_batch
        self.lanes = lanes
        self._start_logits, self._start_state = self._paragraph_start()
        self._start_step_state = self.runner.step_state(self._start_state)
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
            top_k=min(top_k, vocab_size) if top_k else vocab_size,
            rng=np.random.default_rng(seed),
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
        """The request's next-character logits and its state in step form."""
        if not request.prompt_ids:
            return self._start_logits, self._start_step_state
        logits, state = runner.prime(np.array([request.prompt_ids], np.int64), self._start_state)
        return logits[0, -1], runner.step_state(state)

    def _run(self, lane: int, runner: ModelRunner) -> None:
        batch = _Batch.of([], [], 0, len(self.vocab))
        stopping = False
        while not stopping or batch.requests:
            joined, stopping = self._admit(
                lane, runner, len(batch.requests), block=not batch.requests and not stopping, stopping=stopping
            )
            try:
                if joined:
                    states = [state for _, state in joined.values()]
                    newcomers = _Batch.of(list(joined), states, batch.step, len(self.vocab))
                    newcomers.tokens = self._sample(newcomers, np.stack([logits for logits, _ in joined.values()]))
                    batch = batch.joined(newcomers)
                if not batch.requests:
                    continue
                keep = self._advance(batch)
                if keep is not None and not keep.all():
                    batch = batch.kept(keep)
                    self._lane_rows[lane] = len(batch.requests)
                if batch.requests:
                    self.lane_peaks[lane] = max(self.lane_peaks[lane], len(batch.requests))
                    logits, batch.state = runner.step(batch.tokens, batch.state)
                    batch.tokens = self._sample(batch, logits)
            except Exception as exc:  # a failed run must not kill the worker; fail the requests it held
                log.exception("generation step failed")
                for request in dict.fromkeys(batch.requests + list(joined)):
                    request.send(exc)
                batch = _Batch.of([], [], batch.step, len(self.vocab))
                self._lane_rows[lane] = 0

    def _admit(self, lane: int, runner: ModelRunner, running: int, block: bool, stopping: bool) -> tuple[dict, bool]:
        """Prime waiting requests for this lane, up to its share of max_batch; blocks only when nothing runs.

        Lane 0 reads the engine's queue and hands a request to the next lane with room only when it is
        full itself; the other lanes take what they are handed. A few requests thus share one batch:
        two lanes stepping small batches side by side measured slower than one (the GIL changes hands
        twice per step), while a full lane gains from a second core.
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

    @staticmethod
    def _sample(batch: _Batch, logits: np.ndarray) -> np.ndarray:
        return sample_rows(logits, batch.temperatures, batch.top_ks if batch.limited else None, batch.uniforms())

    def _advance(self, batch: _Batch) -> np.ndarray | None:
        """Record each request's new token; deliver full chunks and finished texts.

        Returns which requests go on, or None when all do (every step but the event steps).
        """
        batch.history[:, batch.step % CHUNK_STEPS] = batch.tokens
        batch.step += 1
        if batch.step < batch.next_event:
            return None
        made = batch.step - batch.starts
        done = made == batch.lengths
        keep = ~done
        chars = self.vocab.chars
        for row in np.flatnonzero(done | (made % CHUNK_STEPS == 0)).tolist():
            request, count = batch.requests[row], int(made[row])
            if not request.cancelled:
                columns = np.arange(batch.step - (count - 1) % CHUNK_STEPS - 1, batch.step) % CHUNK_STEPS
                request.add("".join([chars[t] for t in batch.history[row, columns].tolist()]), final=bool(done[row]))
            if count % UNIFORM_BLOCK == 0:
                batch.uniform_ring[row] = request.uniforms(int(batch.starts[row]))
            keep[row] &= not request.cancelled  # cancelled by its caller, or its caller went away
        batch.schedule()
        return keep

    def _fail_waiting(self) -> None:
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request is not _STOP:
                request.send(EngineClosed("the generation engine was closed before this request ran"))
