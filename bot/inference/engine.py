"""Text generation with onnxruntime: one model file, continuous batching. Never imports torch.

Lanes (`Lane`) each own a model runner (bot.inference.runner.ModelRunner), a batch, the queue they take requests
from and their counters, and run on a thread of their own. Each request is primed alone (its whole
prompt in one call), then joins its lane's batch. A batch advances CHUNK characters per call of the
chunk graph (bot.inference.chunk_graph), which samples and steps in onnxruntime without coming back to Python;
between calls, finished requests leave and new ones join. Lane 0 reads the engine's queue and keeps
each request until it holds its share of max_batch; then its `Dispatcher` hands requests to the first
other lane with room. onnxruntime releases the GIL while it runs, so on a CPU the lanes' graphs run on
separate cores at once: many requests gain a core, while a few still share one batch (docs/engine.md).

Every request samples with its own settings (model.sampling.SamplingParams) and uniforms (drawn from
its own numpy Generator), and a row's logits do not depend on its batch mates (fp32: same kernels per
row; int8: exact integer matmuls with fixed activation scales), so a seed gives the same text alone or
in a batch of any size, in any lane.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from bot.inference.api import MAX_LANES, PROVIDERS, EngineBusy, EngineClosed
from bot.inference.chunk_graph import SAMPLER_INPUTS
from bot.inference.ending import Ending, quote_is_open, settle
from bot.inference.modelfile import DEFAULT_MODEL_PATH
from bot.inference.runner import ModelRunner, usable_cores
from model.sampling import (
    PARAGRAPH_BREAK,
    SamplingParams,
    bot_sampling,
    paragraph_openings,
    paragraph_start,
    repetition_start,
)
from model.text import CleaningOptions, Vocab, normalize_prompt, prompt_tokens

log = logging.getLogger(__name__)

MAX_LENGTH = 20_000
MAX_PROMPT_CHARS = 20_000
# Characters per call of the chunk graph: also the streamed chunk, how long a new request may wait
# to join a running batch, and how often a cancelled request is noticed. Python's work per call is
# spread over these characters; larger chunks gain nothing (docs/speed.md).
CHUNK = 16
_STOP = object()
# A second lane pays only when each lane still steps a batch this large (docs/speed.md, docs/engine.md).
MIN_LANE_BATCH = 32


def default_lanes(provider: str, threads: int | None, max_batch: int) -> int:
    """One lane per core on CPU (counting each lane's onnxruntime threads), as long as each lane's share
    of max_batch stays at least MIN_LANE_BATCH rows; one on a GPU, which batches within one graph call."""
    if provider != PROVIDERS["cpu"]:
        return 1
    return max(1, min(MAX_LANES, usable_cores() // (threads or 1), max_batch // MIN_LANE_BATCH))


class InvalidLength(ValueError):
    pass


class InvalidSeed(ValueError):
    pass


class Runner(Protocol):
    """What a lane needs of bot.inference.runner.ModelRunner (tests drive lanes with a fake one)."""

    def zero_state(self, batch: int) -> list[np.ndarray]: ...

    def prime(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]: ...

    def sample(self, logits, state, rows, uniforms) -> tuple: ...


@dataclass(frozen=True)
class _Ask:
    """One call's arguments, as bot.inference.api.Engine names them."""

    prompt: str
    length: int
    sampling: SamplingParams | None
    seed: int | None
    end_sentence: bool
    max_chars: int | None


@dataclass(frozen=True)
class _Opening:
    """Where unprompted requests may start: the next-character logits and the state after a paragraph."""

    logits: np.ndarray
    state: list[np.ndarray]


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    planned: int  # characters to generate at most
    # One per character, drawn when the request is made (off the lanes' threads), padded to whole chunks
    # because a request ending mid-chunk is stepped to the chunk's end with the rest of its batch. At most
    # ~100 KB; drawing 16 per call from each Generator cost ~2 µs per row and call.
    uniforms: np.ndarray
    ending: Ending | None  # None: exactly `planned` characters
    # Called from the worker with a text chunk, then once with None (done) or an exception.
    deliver: Callable[[str | BaseException | None], None]
    streaming: bool  # deliver chunks as they come, not only the whole text at the end
    submitted: float = field(default_factory=time.monotonic)  # when it was queued
    # Tokens the continuation begins with, read by the model with the prompt: the separator after a prompt
    # that ends in characters the model does not know (model.text.prompt_tokens).
    forced: list[int] = field(default_factory=list)
    opening: int = 0  # without a prompt: which of the engine's openings it starts from (its seed's choice)
    generated: int = 0
    unread: list[np.ndarray] = field(default_factory=list)  # tokens not decoded yet
    text: str = ""  # decoded so far
    sent: int = 0  # characters of `text` delivered
    cancelled: bool = False

    def send(self, item: str | BaseException | None) -> None:
        """Hand an item to the caller; a caller that has gone away (closed event loop) only loses its request."""
        try:
            self.deliver(item)
        except Exception:
            log.warning("a caller stopped listening; its request is dropped", exc_info=True)
            self.cancelled = True

    def add(self, tokens: np.ndarray, vocab: Vocab) -> bool:
        """Take the next tokens and pass on what the caller may see now; True once the request is done."""
        self.generated += len(tokens)
        self.unread.append(tokens)
        exhausted = self.generated >= self.planned
        if not self.streaming and not exhausted and (self.ending is None or self.generated <= self.ending.target):
            return False  # the common case, kept cheap: nothing to decide or hand over yet
        self.text += vocab.decode(np.concatenate(self.unread).tolist())
        self.unread.clear()
        if self.ending is None:
            certain, final = len(self.text), self.text if exhausted else None
        else:
            certain, final = settle(self.text, self.ending, exhausted)
        if final is not None:
            if len(final) > self.sent:
                self.send(final[self.sent :])
            self.send(None)
            return True
        if self.streaming and certain > self.sent:
            self.send(self.text[self.sent : certain])
            self.sent = certain
        return False


@dataclass
class _Batch:
    """The requests stepped together and their rows: next-character logits, recurrent state, settings
    and repetition history (each an array with one row per request)."""

    requests: list[_Request]
    state: list[np.ndarray]  # each [layers, batch, hidden]
    rows: dict[str, np.ndarray]  # logits, history, matches, and the settings by chunk-graph input name

    @classmethod
    def of(cls, joined: dict[_Request, tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]]) -> _Batch:
        requests = list(joined)
        primed = list(joined.values())
        rows = {
            "logits": np.stack([p[0] for p in primed]),
            "history": np.stack([p[2] for p in primed]),
            "matches": np.stack([p[3] for p in primed]),
        }
        for setting in SAMPLER_INPUTS:
            rows[setting.name] = np.array([getattr(r.params, setting.name) for r in requests], setting.dtype)
        state = [np.concatenate(parts, axis=1) for parts in zip(*(p[1] for p in primed), strict=True)]
        return cls(requests, state, rows)

    def joined(self, other: _Batch) -> _Batch:
        if not self.requests:
            return other
        return _Batch(
            self.requests + other.requests,
            [np.concatenate([a, b], axis=1) for a, b in zip(self.state, other.state, strict=True)],
            {name: np.concatenate([row, other.rows[name]]) for name, row in self.rows.items()},
        )

    def kept(self, keep: np.ndarray) -> _Batch:
        return _Batch(
            [r for r, k in zip(self.requests, keep, strict=True) if k],
            [s[:, keep] for s in self.state],
            {name: row[keep] for name, row in self.rows.items()},
        )


_EMPTY_BATCH = _Batch([], [], {})


def _settle(future: asyncio.Future, result: str | BaseException) -> None:
    if future.done():  # the caller was cancelled
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class Dispatcher:
    """Lane 0's hand-off: a request lane 0 has no room for goes to the first other lane with room.

    A few requests thus share one batch, since small batches side by side are slower than one, while a full
    lane gains from a second core (docs/engine.md).
    """

    def __init__(self, others: list[Lane]) -> None:
        self.others = others

    def lane_with_room(self) -> Lane | None:
        """The first other lane with room for one more request (counting those handed to it and not yet taken)."""
        return next((lane for lane in self.others if lane.rows + lane.source.qsize() < lane.share), None)

    def stop(self) -> None:
        """Called after every request lane 0 handed on, so each lane finishes its own first."""
        for lane in self.others:
            lane.source.put(_STOP)


class Lane:
    """A worker thread with its own runner, batch, request queue and counters; only its thread writes them.

    `rows` (requests it holds) is read by lane 0's dispatcher, `peak` by anyone: single ints, each
    written by this lane alone.
    """

    def __init__(
        self,
        index: int,
        runner: Runner,
        share: int,
        source: queue.Queue,
        start: Callable[[Runner, _Request], tuple | None],
        vocab: Vocab,
        on_queue_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.index, self.runner, self.share, self.source = index, runner, share, source
        self.dispatcher: Dispatcher | None = None  # lane 0's, set once the other lanes exist
        self._start, self._vocab, self._on_queue_wait = start, vocab, on_queue_wait
        self.batch = _EMPTY_BATCH
        self.rows = 0
        self.peak = 0  # the most requests it has stepped together so far
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name=f"generation-lane-{index}", daemon=True)

    def run(self) -> None:
        while not self.stopping or self.batch.requests:
            joined = self._admit(block=not self.batch.requests and not self.stopping)
            try:
                if joined:
                    self.batch = self.batch.joined(_Batch.of(joined))
                if self.batch.requests:
                    self.peak = max(self.peak, len(self.batch.requests))
                    self._step()
            except Exception as exc:  # a failed run must not kill the worker; fail the requests it held
                log.exception("generation step failed")
                for request in dict.fromkeys(self.batch.requests + list(joined)):
                    request.send(exc)
                self.batch = _EMPTY_BATCH
            self.rows = len(self.batch.requests)

    def _step(self) -> None:
        batch = self.batch
        # A batch whose requests all end sooner takes fewer steps. The uniforms of a shorter chunk are the
        # first of a full one's, so a request's text does not depend on its batch mates.
        steps = min(CHUNK, max(r.planned - r.generated for r in batch.requests))
        uniforms = np.array([r.uniforms[r.generated : r.generated + steps] for r in batch.requests])
        tokens, batch.rows["logits"], batch.state, history = self.runner.sample(
            batch.rows["logits"], batch.state, batch.rows, uniforms
        )
        batch.rows["history"], batch.rows["matches"] = history
        keep = np.array(
            [
                not request.cancelled and not request.add(row[: request.planned - request.generated], self._vocab)
                for request, row in zip(batch.requests, tokens, strict=True)
            ]
        )
        if not keep.all():
            self.batch = batch.kept(keep)

    def _admit(self, block: bool) -> dict[_Request, tuple]:
        """Prime waiting requests, up to this lane's share of max_batch; blocks only when nothing runs."""
        joined: dict[_Request, tuple] = {}
        while not self.stopping:
            full = len(self.batch.requests) + len(joined) >= self.share
            target = self.dispatcher.lane_with_room() if full and self.dispatcher else None
            if full and target is None:
                break
            wait = block and not joined
            if not wait and self.source.empty():
                break  # the common case while a batch runs; cheaper than a get that raises
            try:
                request = self.source.get(block=wait)
            except queue.Empty:
                break
            if request is _STOP:
                self.stopping = True
                if self.dispatcher:
                    self.dispatcher.stop()
            elif request.cancelled:
                continue
            elif target is not None:
                target.source.put(request)
            else:
                try:
                    if self._on_queue_wait is not None:  # inside the try: a failing callback must not end the lane
                        self._on_queue_wait(time.monotonic() - request.submitted)
                    primed = self._start(self.runner, request)
                    if primed is not None:  # None: priming alone finished it
                        joined[request] = primed
                        self.rows = len(self.batch.requests) + len(joined)
                except Exception as exc:
                    log.exception("priming a prompt failed")
                    request.send(exc)
        return joined


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
        int8_weights: str = "auto",
        runner_factory: Callable[[str | Path, str, int | None, str], Runner] = ModelRunner,
        on_queue_wait: Callable[[float], None] | None = None,
    ) -> None:
        """`on_queue_wait` is told, from a lane's thread, how many seconds each request waited for a lane."""
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be positive")
        if lanes is not None and not 1 <= lanes <= MAX_LANES:
            raise ValueError(f"lanes must be a whole number from 1 to {MAX_LANES}, not {lanes!r}")
        self.runner = runner_factory(model_path, providers, threads, int8_weights)
        self.info, self.provider = self.runner.info, self.runner.provider
        count = min(lanes or default_lanes(self.provider, threads, max_batch), max_batch)
        runners = [self.runner] + [
            runner_factory(model_path, providers, threads, int8_weights) for _ in range(count - 1)
        ]
        self.vocab = Vocab(self.info.vocab, self.info.unknown_policy)
        self.cleaning = CleaningOptions.from_dict(self.info.cleaning)
        self.max_batch = max_batch
        _, self._start_state = paragraph_start(self._step_one, self.vocab.encode)
        self._openings = self._paragraph_openings()
        self._empty_history = repetition_start([], len(self.vocab))
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = False
        # Each lane holds at most its share of max_batch; lane 0 fills first.
        shares = [max_batch // count + (i < max_batch % count) for i in range(count)]
        self._lanes = [
            Lane(i, runner, shares[i], self._queue if i == 0 else queue.Queue(), self._prime, self.vocab, on_queue_wait)
            for i, runner in enumerate(runners)
        ]
        self._lanes[0].dispatcher = Dispatcher(self._lanes[1:])
        for lane in self._lanes:
            lane.thread.start()

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    @property
    def lane_peaks(self) -> list[int]:
        """The most requests each lane has stepped together so far."""
        return [lane.peak for lane in self._lanes]

    @property
    def lane_rows(self) -> list[int]:
        """The requests each lane holds now (stepping or being primed)."""
        return [lane.rows for lane in self._lanes]

    @property
    def lane_shares(self) -> list[int]:
        """The most requests each lane holds at once (its share of max_batch)."""
        return [lane.share for lane in self._lanes]

    @property
    def queued(self) -> int:
        """Requests waiting for a lane: in the engine's queue, or handed to a lane that has not taken them yet."""
        return sum(lane.source.qsize() for lane in self._lanes)

    @property
    def capacity(self) -> int:
        """How many requests the engine holds at once, generating or waiting; one more is EngineBusy."""
        return self.max_batch + self._queue.maxsize

    @property
    def full(self) -> bool:
        """True while one more request would be refused with EngineBusy (its queue is full)."""
        return self._queue.full()

    @property
    def peak_batch(self) -> int:
        """The most requests that one lane has stepped together so far."""
        return max(self.lane_peaks)

    # ---- public API ----

    def stream(
        self,
        prompt: str = "",
        length: int = 500,
        *,
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        end_sentence: bool = False,
        max_chars: int | None = None,
    ) -> Iterator[str]:
        """Chunks of the continuation of `prompt` (not including it) as they are produced (bot.inference.api.Engine
        says what the arguments mean)."""
        chunks: queue.SimpleQueue = queue.SimpleQueue()
        ask = _Ask(prompt, length, sampling, seed, end_sentence, max_chars)
        return self._drain(self._submit(chunks.put, ask, streaming=True), chunks)

    def generate(
        self,
        prompt: str = "",
        length: int = 500,
        *,
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        end_sentence: bool = False,
        max_chars: int | None = None,
    ) -> str:
        """The continuation of `prompt` (not including it); blocks until it is complete."""
        done = threading.Event()
        outcome: list[str | BaseException] = []
        ask = _Ask(prompt, length, sampling, seed, end_sentence, max_chars)
        request = self._collect(lambda result: (outcome.append(result), done.set()), ask)
        try:
            done.wait()
        finally:
            request.cancelled = True  # no effect once finished; stops the work if the wait was interrupted
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    async def agenerate(
        self,
        prompt: str = "",
        length: int = 500,
        *,
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        end_sentence: bool = False,
        max_chars: int | None = None,
    ) -> str:
        """generate() for asyncio: waits without holding a thread, so many requests can batch together."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        ask = _Ask(prompt, length, sampling, seed, end_sentence, max_chars)
        request = self._collect(lambda result: loop.call_soon_threadsafe(_settle, future, result), ask)
        try:
            return await future
        finally:
            request.cancelled = True

    async def astream(
        self,
        prompt: str = "",
        length: int = 500,
        *,
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        end_sentence: bool = False,
        max_chars: int | None = None,
    ) -> AsyncIterator[str]:
        """stream() for asyncio."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        ask = _Ask(prompt, length, sampling, seed, end_sentence, max_chars)
        request = self._submit(lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item), ask, streaming=True)
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
        for lane in self._lanes:
            lane.thread.join()
        self._fail_waiting()

    def __enter__(self) -> GenerationEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- request handling (caller's thread) ----

    def _submit(self, deliver: Callable[[str | BaseException | None], None], ask: _Ask, streaming: bool) -> _Request:
        """Check and queue a request; EngineBusy when the queue is full."""
        prompt, length, max_chars, seed = ask.prompt, ask.length, ask.max_chars, ask.seed
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, not {type(prompt).__name__}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_LENGTH:
            raise InvalidLength(f"length must be a whole number from 1 to {MAX_LENGTH}, not {length!r}")
        if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
            raise InvalidLength(f"max_chars must be a whole number of at least 1 or None, not {max_chars!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InvalidSeed(f"seed must be a non-negative whole number or None, not {seed!r}")
        if self._closed:
            raise EngineClosed("the generation engine is closed")
        params = ask.sampling or bot_sampling()
        if params.top_k >= len(self.vocab):
            params = params.with_options(top_k=0)  # no limit, and no top-k step in the graph
        quoted = quote_is_open(normalize_prompt(prompt, self.cleaning))
        ending = Ending(length, max_chars or MAX_LENGTH, quoted) if ask.end_sentence else None
        planned = ending.to_generate if ending else min(length, max_chars or length)
        prompt_ids, separator = prompt_tokens(prompt, self.vocab, self.cleaning)
        rng = np.random.default_rng(seed)
        request = _Request(
            prompt_ids=prompt_ids,
            params=params,
            planned=planned,
            # A chunk past `planned`: forced tokens put a request's chunks off the multiples of CHUNK.
            uniforms=rng.random(planned + CHUNK, np.float32),
            ending=ending,
            deliver=deliver,
            streaming=streaming,
            forced=self.vocab.encode(separator),
            # Drawn after the uniforms, so that a prompt's text is what it was before openings existed.
            opening=0 if prompt_ids else int(rng.integers(len(self._openings))),
        )
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise EngineBusy(
                f"the generation engine is busy ({self._queue.maxsize} requests waiting); try again in a moment"
            ) from None
        return request

    def _collect(self, on_done: Callable[[str | BaseException], None], ask: _Ask) -> _Request:
        """Submit a request whose text is handed over once, when complete (no wake-ups per chunk)."""
        parts: list[str] = []

        def deliver(item: str | BaseException | None) -> None:
            if item is None:
                on_done("".join(parts))
            elif isinstance(item, BaseException):
                on_done(item)
            else:
                parts.append(item)

        return self._submit(deliver, ask, streaming=False)

    @staticmethod
    def _drain(request: _Request, chunks: queue.SimpleQueue) -> Iterator[str]:
        try:
            while (item := chunks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled = True

    # ---- priming (lanes' threads) ----

    def _step_one(self, tokens: list[int], state: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, state = self.runner.prime(np.array([tokens], np.int64), state or self.runner.zero_state(1))
        return logits[0, -1], state

    def _step_rows(self, tokens: np.ndarray, state: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        if state is None:
            state = [np.repeat(part, len(tokens), axis=1) for part in self._start_state]
        logits, state = self.runner.prime(tokens[:, None].astype(np.int64), state)
        return logits[:, -1], state

    def _paragraph_openings(self) -> list[_Opening]:
        """Where unprompted requests start (model.sampling.paragraph_openings); after a paragraph break if
        none came out (a model that never ends a sentence)."""
        openings = [
            _Opening(logits, state)
            for logits, state in paragraph_openings(
                self._step_rows, lambda state, row: [part[:, row : row + 1].copy() for part in state], self.vocab.encode
            )
        ]
        if not openings:
            logits, state = self.runner.prime(
                np.array([self.vocab.encode(PARAGRAPH_BREAK) or [0]], np.int64), self._start_state
            )
            openings.append(_Opening(logits[0, -1], state))
        return openings

    def _prime(self, runner: Runner, request: _Request) -> tuple | None:
        """The request's next-character logits, its state after the prompt (and any forced tokens) and its
        repetition history; None if the forced tokens were all it had to write."""
        opening = self._openings[request.opening]
        tokens = request.prompt_ids + request.forced
        if not tokens:
            return opening.logits, opening.state, *self._empty_history
        # A prompt is read after paragraph_start's sentence, as always; forced tokens alone after the opening.
        start = self._start_state if request.prompt_ids else opening.state
        logits, state = runner.prime(np.array([tokens], np.int64), start)
        if request.forced and request.add(np.array(request.forced), self.vocab):
            return None
        return logits[0, -1], state, *repetition_start(tokens, len(self.vocab))

    def _fail_waiting(self) -> None:
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request is not _STOP:
                request.send(EngineClosed("the generation engine was closed before this request ran"))
