"""Sampling settings and their reference arithmetic, shared by the bot and `python -m model sample`. No torch.

`SamplingParams` holds every sampling setting and is the one place their bounds are checked (the bot's
commands, its configuration, the engine and `python -m model sample` all build one). The numpy
functions here are the specification that bot/inference/chunk_graph.py builds into ONNX and that
`python -m model sample` runs directly; docs/engine.md explains each step and the order they run in:

1. repetition penalty: subtract `repetition_penalty` from the logit of every character that would
   repeat a `repeat_ngram`-character string already written in the last REPEAT_WINDOW characters;
2. truncation on the model's own distribution (temperature 1): top-k, min-p (keep the characters whose
   probability is at least `min_p` times the top one's, Nguyen et al. 2024), top-p (the smallest set of
   likeliest characters whose probabilities reach `top_p`);
3. temperature, then softmax over what is left.

Truncating before the temperature (as llama.cpp's default chain does) keeps the set of allowed characters
the same at every temperature: temperature then only reweights plausible characters, so a hot speech
stays made of words. The penalty is subtracted before the temperature too, so it weighs most where
loops happen, at low temperature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

# The lowest temperature, where sampling still writes text. The chunk graph divides float32 logits by
# the temperature: measured on the bundled model (chunk graph, plain and the bot's sampling, 3 seeds),
# every temperature from 0.001 down to 1e-37 wrote the same greedy text, whatever the seed; at 1e-38 the
# quotient overflowed to inf and every speech came out as newlines (shown as "…"), and below 1.4e-45 the
# temperature is 0 in float32. So nothing below 0.001 writes anything 0.001 does not, and 0.001 is 34
# orders of magnitude above the overflow (logits would have to exceed 1e35).
TEMPERATURE_MIN = 0.001
TEMPERATURE_MAX = 2.0
TEMPERATURE_RANGE = f"from {TEMPERATURE_MIN:g} to {TEMPERATURE_MAX:g}"
REPETITION_PENALTY_MAX = 20.0
REPEAT_NGRAM_MIN, REPEAT_NGRAM_MAX = 2, 64
# How far back the repetition penalty looks, in characters: at low temperature a model also loops over
# whole paragraphs, which a shorter window lets through (docs/engine.md); the chunk graph's cost per
# step grows with it.
REPEAT_WINDOW = 1024
SENTENCE_ENDERS = ".!?"
# The greedy walk from a newline to the first sentence end (see paragraph_start).
PARAGRAPH_START_MAX_CHARS = 300
# The longest sentence paragraph_openings samples; the engine steps all its rows until the last one ends, at load.
PARAGRAPH_OPENING_MAX_CHARS = 150
# How many places unprompted speeches start from, and the seed that samples them (paragraph_openings): 16
# and 32 brought the first words of 200 speeches equally close to the training text's (docs/quality.md).
PARAGRAPH_OPENINGS = 16
PARAGRAPH_OPENINGS_SEED = 0
PARAGRAPH_BREAK = "\n\n"  # a blank line: how most of the training text's paragraphs end (docs/engine.md)


class InvalidSampling(ValueError):
    """A sampling setting out of range; the message names it and what is valid."""

    def as_flag(self, prefix: str = "--") -> str:
        """The message with the setting named as its command-line flag (top_p -> --top-p; with prefix
        "--sample-", --sample-top-p)."""
        name, _, rest = str(self).partition(" ")
        return f"{prefix}{name.replace('_', '-')} {rest}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How characters are drawn. The defaults are plain sampling at temperature 0.9: every setting that
    changes the model's distribution is off (top_k 0, top_p 1, min_p 0, repetition_penalty 0)."""

    temperature: float = 0.9
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 0.0  # subtracted from a repeating character's logit
    repeat_ngram: int = 6  # characters in the strings that count as repeated

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or not TEMPERATURE_MIN <= self.temperature <= TEMPERATURE_MAX:
            raise InvalidSampling(f"temperature must be {TEMPERATURE_RANGE}, not {self.temperature!r}")
        if not _is_whole(self.top_k) or self.top_k < 0:
            raise InvalidSampling(f"top_k must be a whole number, 0 (off) or more, not {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidSampling(f"top_p must be above 0 and at most 1 (1: off), not {self.top_p!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p < 1:
            raise InvalidSampling(f"min_p must be at least 0 (off) and below 1, not {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or not 0 <= self.repetition_penalty <= REPETITION_PENALTY_MAX:
            raise InvalidSampling(
                f"repetition_penalty must be from 0 (off) to {REPETITION_PENALTY_MAX:g}, "
                f"not {self.repetition_penalty!r}"
            )
        if not _is_whole(self.repeat_ngram) or not REPEAT_NGRAM_MIN <= self.repeat_ngram <= REPEAT_NGRAM_MAX:
            raise InvalidSampling(
                f"repeat_ngram must be a whole number from {REPEAT_NGRAM_MIN} to {REPEAT_NGRAM_MAX}, "
                f"not {self.repeat_ngram!r}"
            )
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "min_p", float(self.min_p))
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))

    @property
    def is_plain(self) -> bool:
        """Temperature (and top-k) only, as `python -m model sample` has always sampled."""
        return self.top_p == 1 and self.min_p == 0 and self.repetition_penalty == 0

    def with_options(self, **options: Any) -> SamplingParams:
        """A copy with the given settings changed; None keeps a setting as it is."""
        return replace(self, **{name: value for name, value in options.items() if value is not None})

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_args(cls, args: Any, base: SamplingParams | None = None) -> SamplingParams:
        """`base` (default: plain) with each setting that `args` (parsed flags) has as an attribute and
        not None."""
        present = {f.name: getattr(args, f.name, None) for f in fields(cls)}
        return replace(base or cls(), **{name: value for name, value in present.items() if value is not None})


# The bot's sampling, chosen by measurement (docs/quality.md, "Text statistics"; bench/text_stats.py), at
# its default temperature; bot_sampling gives it at any other.
BOT_SAMPLING = SamplingParams(temperature=0.8, min_p=0.1, repetition_penalty=3.0, repeat_ngram=6)
# Above this temperature the bot's min-p falls with the square of the temperature (bot_sampling).
MIN_P_LOOSENS_ABOVE = 1.0


def bot_sampling(temperature: float = BOT_SAMPLING.temperature, min_p_floor: float = 0.0) -> SamplingParams:
    """The bot's sampling at `temperature`: BOT_SAMPLING, whose min-p loosens as the temperature rises
    past MIN_P_LOOSENS_ABOVE (0.1 up to 1, 0.044 at 1.5, 0.025 at 2), never below `min_p_floor`.

    A fixed min-p lets a hot speech choose only among the characters it would have chosen among at
    temperature 1, only more evenly, so 2 wrote much what 1.2 did; loosening it lets in the rarer
    words that make a hot speech wild, while the real-word rate stays at least 0.95 (docs/quality.md,
    "The temperature knob"). Every caller of the engine asks through this, so the bot has one sampling.
    A weaker network writes fewer real words at a given min-p, so a voice may stop the loosening sooner
    (its model file's min_p_floor, bot.core.voices.Voice.sampling; docs/voices.md).
    """
    loosening = min(1.0, MIN_P_LOOSENS_ABOVE / temperature) ** 2 if temperature > 0 else 1.0
    return BOT_SAMPLING.with_options(temperature=temperature, min_p=max(min_p_floor, BOT_SAMPLING.min_p * loosening))


def repetition_start(tokens: Sequence[int], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The repetition penalty's history after reading `tokens`: the last REPEAT_WINDOW tokens (`pad`
    before the first) and, for each, how many characters the text ending there shares with the text's
    end (capped at REPEAT_NGRAM_MAX - 1), as repetition_step keeps them. Both int32 [REPEAT_WINDOW]."""
    history = np.full((1, REPEAT_WINDOW), pad, np.int32)
    matches = np.zeros((1, REPEAT_WINDOW), np.int32)
    # Only the last REPEAT_NGRAM_MAX characters before the window can still change a match length.
    for token in tokens[-(REPEAT_WINDOW + REPEAT_NGRAM_MAX) :]:
        history, matches = repetition_step(history, matches, np.array([token], np.int32))
    return history[0], matches[0]


def repetition_step(history: np.ndarray, matches: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Append each row's token [batch] to its history [batch, window] and update the match lengths.

    The text ending at history[j + 1] shares n + 1 characters with the text ending at the new token if
    history[j + 1] is that token and the text ending at history[j] shared n with the old end: one
    comparison per position and step instead of a search.
    """
    following = history[:, 1:]
    grown = np.minimum(matches[:, :-1] + 1, REPEAT_NGRAM_MAX - 1)
    head = np.where(following == tokens[:, None], grown, 0).astype(matches.dtype)
    return (
        np.concatenate([following, tokens[:, None].astype(history.dtype)], axis=1),
        np.concatenate([head, np.zeros((len(tokens), 1), matches.dtype)], axis=1),
    )


def repeated_characters(
    history: np.ndarray, matches: np.ndarray, repeat_ngram: np.ndarray, vocab_size: int
) -> np.ndarray:
    """[batch, vocab] bool: the characters that would end a repeat_ngram-character string that is already
    in the history (the text ending at history[j] shares repeat_ngram - 1 characters with the text's
    end, so history[j + 1] would make the string whole again)."""
    hit = matches[:, :-1] >= (repeat_ngram[:, None] - 1)
    repeated = np.zeros((len(history), vocab_size + 1), bool)  # the last column takes the pad
    rows = np.broadcast_to(np.arange(len(history))[:, None], hit.shape)
    repeated[rows[hit], np.minimum(history[:, 1:][hit], vocab_size)] = True
    return repeated[:, :vocab_size]


def sampling_distribution(
    logits: np.ndarray, params: Sequence[SamplingParams], repeated: np.ndarray | None = None
) -> np.ndarray:
    """[batch, vocab] probabilities to draw from: logits [batch, vocab] through the steps in this
    module's docstring, one SamplingParams per row. Computed in float64."""
    scores = logits.astype(np.float64).copy()
    for row, p in enumerate(params):
        x = scores[row]
        if repeated is not None:
            x -= p.repetition_penalty * repeated[row]
        if p.top_k and p.top_k < len(x):
            x[x < np.sort(x)[-p.top_k]] = -np.inf
        if p.min_p:
            x[x < x.max() + math.log(p.min_p)] = -np.inf
        if p.top_p < 1:
            ordered = np.sort(x)[::-1]
            probabilities = np.exp(ordered - ordered[0])
            probabilities /= probabilities.sum()
            before = np.cumsum(probabilities) - probabilities  # the mass of the likelier characters
            x[x < ordered[before < p.top_p].min()] = -np.inf
        x /= p.temperature
        x -= x.max()
    probabilities = np.exp(scores)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def paragraph_start(step: Callable[[list[int], Any], tuple[Any, Any]], encode: Callable[[str], list[int]]):
    """The last logits and the state at the start of a sentence that the model wrote itself.

    `step(tokens, state)` runs the network on tokens (state None: a zero state) and returns the logits
    after the last one (anything with argmax()) and the new state. Training sees a zero state once an
    epoch, so text sampled straight from it starts with odd characters ("éFire, that"). Instead the model
    reads a newline and writes greedily until it ends a sentence (". ", "? ", "! " or a newline; at most
    PARAGRAPH_START_MAX_CHARS), and generation starts there. It is deterministic: the engine does it once
    at load, `python -m model sample` before each sample.
    """
    newline = encode("\n")[:1] or [0]
    enders = set(encode(SENTENCE_ENDERS))
    breaks = set(encode(" ")) | set(newline)
    logits, state = step(newline, None)
    previous = newline[0]
    for _ in range(PARAGRAPH_START_MAX_CHARS):
        token = int(logits.argmax())
        logits, state = step([token], state)
        if token in breaks and previous in enders:
            break
        previous = token
    return logits, state


def paragraph_openings(
    step: Callable[[np.ndarray, Any], tuple[np.ndarray, Any]],
    take: Callable[[Any, int], Any],
    encode: Callable[[str], list[int]],
    count: int = PARAGRAPH_OPENINGS,
    seed: int = PARAGRAPH_OPENINGS_SEED,
) -> list[tuple[np.ndarray, Any]]:
    """Where new paragraphs begin: the logits and state after each of up to `count` texts, each a
    paragraph break, one sentence sampled at temperature 1 with the bot's min-p (seeded: the same every
    time) and a paragraph break.

    `step(tokens [count], state)` steps `count` rows of the network on one token each from `state` (None:
    where paragraph_start left it, in every row) and returns their logits [count, vocab] and the new
    state; `take(state, row)` is one row's part of a state. From paragraph_start's state alone every
    unprompted speech would open in the context of its one greedy sentence, after which the model's
    first word is mostly "We" (docs/quality.md, "Openings"); after sampled sentences of their own, the
    openings spread like the training text's paragraph openings. A sentence needs a letter ("..." alone
    is none); a row whose sentence is still unfinished after PARAGRAPH_OPENING_MAX_CHARS is left out.
    """
    paragraph_break = encode(PARAGRAPH_BREAK) or [0]
    enders, breaks = set(encode(SENTENCE_ENDERS)), set(encode(" \n"))
    letters = set(encode("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    params = [SamplingParams(temperature=1.0, min_p=BOT_SAMPLING.min_p)] * count
    rng = np.random.default_rng(seed)
    queued = [list(paragraph_break) for _ in range(count)]  # what each row reads next instead of a sample
    closing = [False] * count  # reading the break after its sentence
    worded = [False] * count
    tokens = np.zeros(count, np.int64)
    logits, state = None, None
    openings: dict[int, tuple[np.ndarray, Any]] = {}
    for _ in range(PARAGRAPH_OPENING_MAX_CHARS + 2 * len(paragraph_break)):
        drawn = tokens if logits is None else _draw(sampling_distribution(logits, params), rng)
        for row in range(count):
            if queued[row]:
                tokens[row] = queued[row].pop(0)
            elif row not in openings and worded[row] and tokens[row] in enders and drawn[row] in breaks:
                # The sentence ended: a paragraph break instead of the space or newline after it.
                queued[row], closing[row] = list(paragraph_break), True
                tokens[row] = queued[row].pop(0)
            else:
                tokens[row] = drawn[row]
                worded[row] = worded[row] or int(drawn[row]) in letters
        logits, state = step(tokens, state)
        for row in range(count):
            if closing[row] and not queued[row] and row not in openings:
                openings[row] = (logits[row].copy(), take(state, row))
        if len(openings) == count:
            break
    return [openings[row] for row in sorted(openings)]


def _draw(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row [batch] of probabilities [batch, vocab], by inverse CDF as the chunk graph draws."""
    cumulative = np.cumsum(probabilities, axis=1)
    return np.minimum((cumulative < rng.random((len(cumulative), 1))).sum(axis=1), cumulative.shape[1] - 1)
