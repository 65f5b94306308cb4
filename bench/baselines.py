"""Classic character-level baselines for bits per character: unigram, Kneser-Ney n-grams, compressors. Torch-free.

All scores are bits per character of a split, given a training text. The n-gram models are static
(fit once on train, like the network); the compressors are adaptive (they also learn from the split
as they read it), which is how the literature compares them with language models.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import pyppmd
import zstandard

from model.text import is_shouted

# n-grams are hashed to 64 bits with a polynomial rolling hash; with a few million distinct n-grams
# a collision has a probability of about 1e-7, so exact keys (which overflow 64 bits beyond about
# nine characters of a 100-symbol vocabulary) are not worth their cost.
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


def unigram_bits(train: np.ndarray, ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Bits of each of `ids` under train's character frequencies with add-one smoothing."""
    counts = np.bincount(train, minlength=vocab_size) + 1.0
    return -np.log2(counts[ids] / counts.sum())


def context_keys(ids: np.ndarray, max_context: int) -> np.ndarray:
    """keys[m, t]: hash of the m characters before position t (ids[t-m:t]); 0 where t < m."""
    symbols = ids.astype(np.uint64) + np.uint64(1)  # +1 so that token 0 still changes the hash
    keys = np.zeros((max_context + 1, len(ids)), dtype=np.uint64)
    power = 1
    for m in range(1, max_context + 1):
        # Extending a context to the left adds its new first character times base^(m-1).
        keys[m, m:] = keys[m - 1, m:] + symbols[:-m] * np.uint64(power)
        power = power * int(_HASH_BASE) & _MASK64
    return keys


def _ngram_keys(context: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return context * _HASH_BASE + targets.astype(np.uint64) + np.uint64(1)


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values[i] where sorted_keys[i] == query, else 0."""
    if len(sorted_keys) == 0:
        return np.zeros(len(queries), dtype=values.dtype)
    index = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
    return np.where(sorted_keys[index] == queries, values[index], 0)


def modified_kn_discounts(counts: np.ndarray) -> np.ndarray:
    """Chen & Goodman's discounts D[1], D[2], D[3+] from the counts of counts (D[0] = 0)."""
    n1, n2, n3, n4 = (np.count_nonzero(counts == k) for k in (1, 2, 3, 4))
    if min(n1, n2, n3, n4) == 0:  # too little text to estimate them: the classic single discount
        return np.array([0.0, 0.75, 0.75, 0.75])
    y = n1 / (n1 + 2 * n2)
    found = np.array([0.0, 1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3])
    # A discount must stay within (0, k] for an n-gram seen k times, or the distribution breaks.
    return np.clip(found, [0, 0.05, 0.05, 0.05], [0, 1, 2, 3])


class _Level:
    """Counts of (context of m characters, next character) pairs, and per-context totals."""

    def __init__(self, context: np.ndarray, ngram: np.ndarray, counts: np.ndarray) -> None:
        order = np.argsort(ngram)
        self.ngram, self.counts = ngram[order], counts[order]
        self.discounts = modified_kn_discounts(self.counts)
        self.context, inverse = np.unique(context[order], return_inverse=True)
        groups = len(self.context)
        self.total = np.bincount(inverse, weights=self.counts, minlength=groups)
        # The mass taken from the seen characters of a context goes to the lower order.
        taken = self.discounts[np.minimum(self.counts, 3)]
        self.backoff_mass = np.bincount(inverse, weights=taken, minlength=groups)

    def interpolate(self, context: np.ndarray, targets: np.ndarray, lower: np.ndarray) -> np.ndarray:
        counts = _lookup(self.ngram, self.counts, _ngram_keys(context, targets))
        total = _lookup(self.context, self.total, context)
        mass = _lookup(self.context, self.backoff_mass, context)
        seen = total > 0
        safe_total = np.where(seen, total, 1.0)
        discounted = np.maximum(counts - self.discounts[np.minimum(counts, 3)], 0.0)
        return np.where(seen, (discounted + mass * lower) / safe_total, lower)


class KneserNey:
    """Interpolated modified Kneser-Ney character n-gram model, fit on a training text.

    Built once up to `max_order`; any order up to it can then be scored, which makes choosing the
    order on validation cheap. The highest order of a model uses raw counts, the lower orders
    continuation counts (in how many different contexts a string follows), and order 0 is uniform
    over the vocabulary, so every character gets a probability and they sum to one.
    """

    def __init__(self, train: np.ndarray, vocab_size: int, max_order: int) -> None:
        if max_order < 1:
            raise ValueError(f"the n-gram order must be at least 1, not {max_order}")
        self.vocab_size, self.max_order = vocab_size, max_order
        train = np.asarray(train, dtype=np.int64)
        keys = context_keys(train, max_order - 1)
        self.raw: list[_Level] = []
        self.continuation: list[_Level] = []
        first_positions = []  # one training position of each distinct n-gram, per context length
        for m in range(max_order):
            ngram = _ngram_keys(keys[m, m:], train[m:])
            unique, first, counts = np.unique(ngram, return_index=True, return_counts=True)
            self.raw.append(_Level(keys[m, m:][first], unique, counts))
            first_positions.append(m + first)
        for m in range(max_order - 1):
            # An (m+1)-gram's continuation count: how many distinct characters precede it, i.e. how
            # many distinct (m+2)-grams end with it.
            positions = first_positions[m + 1]
            suffixes = _ngram_keys(keys[m, positions], train[positions])
            unique, first, counts = np.unique(suffixes, return_index=True, return_counts=True)
            self.continuation.append(_Level(keys[m, positions[first]], unique, counts))

    def _probabilities(self, keys: np.ndarray, targets: np.ndarray, available: np.ndarray, order: int) -> np.ndarray:
        """P(target | context); keys[m] hash each target's m-character context, `available` its length."""
        probs = np.full(len(targets), 1.0 / self.vocab_size)
        for m in range(min(order, keys.shape[0])):
            level = self.raw[m] if m == order - 1 else self.continuation[m]
            usable = available >= m
            probs[usable] = level.interpolate(keys[m, usable], targets[usable], probs[usable])
        return probs

    def bits(self, ids: np.ndarray, order: int) -> np.ndarray:
        """Bits of ids[1:], each character predicted from the characters before it in `ids`."""
        self._check_order(order)
        ids = np.asarray(ids, dtype=np.int64)
        keys = context_keys(ids, order - 1)
        positions = np.arange(len(ids))
        probs = self._probabilities(keys[:, 1:], ids[1:], positions[1:], order)
        return -np.log2(probs)

    def distribution(self, context: Sequence[int], order: int) -> np.ndarray:
        """P(next character | context) for every character of the vocabulary."""
        self._check_order(order)
        context = list(context)[-(order - 1) :] if order > 1 else []
        candidates = np.arange(self.vocab_size)
        ids = np.array([*context, 0], dtype=np.int64)
        keys = np.repeat(context_keys(ids, order - 1)[:, -1:], self.vocab_size, axis=1)
        available = np.full(self.vocab_size, len(context))
        return self._probabilities(keys, candidates, available, order)

    def _check_order(self, order: int) -> None:
        if not 1 <= order <= self.max_order:
            raise ValueError(f"order must be between 1 and {self.max_order} (the order the model was built with)")


Compressor = Callable[[bytes], bytes]


def compressors() -> dict[str, Compressor]:
    """General-purpose compressors at their strongest settings."""
    zstd = zstandard.ZstdCompressor(level=22)
    return {
        # zlib's window is 32 KB, so it barely sees the training text: effectively unconditional.
        "zlib -9": lambda data: zlib.compress(data, 9),
        "bzip2 -9": lambda data: bz2.compress(data, 9),
        "xz -9e": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
        "zstd -22": zstd.compress,
    }


def ppmd(order: int, mem_size: int = 256 << 20) -> Compressor:
    """PPMd variant I rev. 2 (Shkarin's PPMd8, as in ZIP) of the given order.

    On this corpus it beat variant H (7-Zip's PPMd7) at every order from 6 to 24, by 0.006 bits per
    character at order 12, the best; memory beyond 256 MB changed nothing. The strongest PPMd is the bar.
    """
    return lambda data: pyppmd.compress(data, max_order=order, mem_size=mem_size, variant="I")


def conditional_bits(
    compress: Compressor, train: bytes, split: bytes, chars: int, train_size: int | None = None
) -> float:
    """8 * (|C(train + split)| - |C(train)|) / chars: the cost of the split given the training text."""
    if train_size is None:
        train_size = len(compress(train))
    return 8 * (len(compress(train + split)) - train_size) / chars


def shouted_mask(text: str) -> np.ndarray:
    """For each character of text, whether its line is typed in capitals (model.text.is_shouted)."""
    flags: list[bool] = []
    for line in text.split("\n"):
        flags.extend([is_shouted(line)] * (len(line) + 1))  # the newline belongs to its line
    return np.array(flags[: len(text)], dtype=bool)
