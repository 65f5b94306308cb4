"""Corpus cleaning and the character vocabulary. Torch-free: the bot imports this to normalise prompts.

Cleaning turns a raw transcript into the kind of text users type and the model should write:
speech headers and stage directions go, typographic characters become keyboard characters,
and whitespace is collapsed. Every step is switchable and the options travel with the dataset,
the checkpoint and the ONNX file, so a prompt is always normalised the way the training text was.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

# Typographic characters mapped to what a keyboard produces. Users type `'`, not `’`, so a model
# trained on the raw corpus would treat their prompts as unusual text.
KEYBOARD_EQUIVALENTS: dict[str, str] = {
    "\u2018": "'",  # ‘
    "\u2019": "'",  # ’
    "\u201a": "'",  # ‚
    "\u201b": "'",  # ‛
    "\u2032": "'",  # ′
    "\u00b4": "'",  # ´
    "`": "'",
    "\u201c": '"',  # “
    "\u201d": '"',  # ”
    "\u201e": '"',  # „
    "\u201f": '"',  # ‟
    "\u2033": '"',  # ″
    "\u00ab": '"',  # «
    "\u00bb": '"',  # »
    "\u2013": "-",  # en dash
    "\u2014": " - ",  # em dash, usually written as a spaced hyphen
    "\u2015": " - ",
    "\u2012": "-",
    "\u2010": "-",
    "\u2011": "-",
    "\u2212": "-",  # minus sign
    "\u2026": "...",  # …
    "\u00a0": " ",  # no-break space
    "\u2009": " ",
    "\u200a": " ",
    "\u2002": " ",
    "\u2003": " ",
    "\u202f": " ",
    "\u200b": "",  # zero-width space
    "\ufeff": "",  # a BOM in the middle of concatenated files
    "\t": " ",
}
_KEYBOARD_TABLE = str.maketrans(KEYBOARD_EQUIVALENTS)

SPEECH_HEADER = re.compile(r"^[ \t]*SPEECH[ \t]+\d+[ \t]*:?[ \t]*$", re.MULTILINE)
# Stage directions: (APPLAUSE), [ CHEERING ], [Audience response inaudible]. Nested or unclosed
# brackets are left alone rather than eating the rest of the speech.
STAGE_DIRECTION = re.compile(r"[ \t]*(\([^()\n]{0,200}\)|\[[^\[\]\n]{0,200}\])")
_SPACES = re.compile(r"[ \t]+")
_SPACE_BEFORE_NEWLINE = re.compile(r" +\n|\n +")
_BLANK_LINES = re.compile(r"\n{3,}")

CAPS_POLICIES = ("keep", "sentence", "lower", "drop")
UNKNOWN_POLICIES = ("skip", "space", "nearest")

# A line counts as shouted when it has at least this many letters and nearly all are capitals.
_CAPS_MIN_LETTERS = 12
_CAPS_SHARE = 0.9
_SENTENCE_START = re.compile(r"(^|[.!?]\s+|\n)([a-z])")
_LONE_I = re.compile(r"\bi\b('[a-z]+)?")
_WORD = re.compile(r"[a-z]+")
# A word preceded by a lowercase word and a space is mid-sentence, so its case is the word's own.
_MID_SENTENCE_WORD = re.compile(r"(?<=[a-z,] )([A-Za-z][a-z]+)\b")


@dataclass(frozen=True)
class CleaningOptions:
    """How raw text becomes training text. Stored in dataset, checkpoint and ONNX metadata."""

    remove_headers: bool = True
    remove_stage_directions: bool = True
    normalize_typography: bool = True
    collapse_whitespace: bool = True
    lowercase: bool = False
    # All-caps passages (most of the corpus's last speech is typed in capitals): "sentence" rewrites
    # them in sentence case so the model neither learns to shout at random nor loses a tenth of the
    # data; "keep" leaves them, "lower" lowercases them, "drop" removes those lines.
    caps_policy: str = "sentence"

    def __post_init__(self) -> None:
        if self.caps_policy not in CAPS_POLICIES:
            raise ValueError(f"caps policy must be one of {', '.join(CAPS_POLICIES)}, not {self.caps_policy!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CleaningOptions:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def is_shouted(line: str) -> bool:
    """True for a line typed mostly in capitals (a shouted passage, not an acronym)."""
    letters = [ch for ch in line if ch.isalpha()]
    if len(letters) < _CAPS_MIN_LETTERS:
        return False
    return sum(ch.isupper() for ch in letters) >= _CAPS_SHARE * len(letters)


def learn_true_case(lines: Iterable[str]) -> dict[str, str]:
    """Words that the normally-cased text writes with a capital mid-sentence (names, places).

    Maps the lowercase form to its capitalised form when that is at least twice as common, so that
    sentence-casing a shouted passage writes "Indiana", not "indiana".
    """
    capitalised: Counter[str] = Counter()
    lowercase: Counter[str] = Counter()
    for line in lines:
        for match in _MID_SENTENCE_WORD.finditer(line):
            word = match.group(1)
            if word[0].isupper():
                capitalised[word] += 1
            else:
                lowercase[word] += 1
    forms: dict[str, str] = {}
    for word, count in capitalised.most_common():
        key = word.lower()
        if key not in forms and count > 2 * lowercase[key]:
            forms[key] = word
    return forms


def sentence_case(line: str, true_case: dict[str, str] | None = None) -> str:
    """Lowercase a shouted line, then restore capitals at sentence starts, for I, and for known names."""
    lowered = line.lower()
    if true_case:
        lowered = _WORD.sub(lambda m: true_case.get(m.group(0), m.group(0)), lowered)
    lowered = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), lowered)
    lowered = _LONE_I.sub(lambda m: "I" + (m.group(1) or ""), lowered)
    return lowered[:1].upper() + lowered[1:]


def _apply_caps_policy(text: str, policy: str) -> str:
    if policy == "keep":
        return text
    lines = text.split("\n")
    true_case = learn_true_case(line for line in lines if not is_shouted(line)) if policy == "sentence" else {}
    out = []
    for line in lines:
        if not is_shouted(line):
            out.append(line)
        elif policy == "sentence":
            out.append(sentence_case(line, true_case))
        elif policy == "lower":
            out.append(line.lower())
        # "drop": the line is left out
    return "\n".join(out)


def normalize_newlines(text: str) -> str:
    """Strip a BOM and turn CRLF / CR line ends into LF."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def normalize_characters(text: str, options: CleaningOptions) -> str:
    """The per-character part of cleaning, shared by corpus preparation and prompt normalisation."""
    text = normalize_newlines(text)
    if options.normalize_typography:
        # NFKC folds ligatures and full-width forms; the table then maps quotes and dashes.
        text = unicodedata.normalize("NFKC", text).translate(_KEYBOARD_TABLE)
    if options.lowercase:
        text = text.lower()
    return text


def clean_text(text: str, options: CleaningOptions | None = None) -> str:
    """Clean a whole corpus document according to `options`."""
    options = options or CleaningOptions()
    text = normalize_characters(text, options)
    if options.remove_headers:
        text = SPEECH_HEADER.sub("", text)
    if options.remove_stage_directions:
        text = STAGE_DIRECTION.sub("", text)
    if not options.lowercase:
        text = _apply_caps_policy(text, options.caps_policy)
    if options.collapse_whitespace:
        text = _SPACES.sub(" ", text)
        text = _SPACE_BEFORE_NEWLINE.sub("\n", text)
        text = _BLANK_LINES.sub("\n\n", text)
        text = text.strip("\n ") + "\n"
    return text


def normalize_prompt(prompt: str, options: CleaningOptions) -> str:
    """Normalise a user's prompt like the training text, without removing anything they wrote."""
    text = normalize_characters(prompt, options)
    if options.collapse_whitespace:
        text = _SPACES.sub(" ", text)
    return text


def prompt_tokens(prompt: str, vocab: Vocab, options: CleaningOptions) -> tuple[list[int], str]:
    """The token ids the model reads for a user's prompt, and the separator its continuation must begin
    with ("" but after a prompt whose end the model cannot see).

    The prompt is normalised like the training text, its characters outside the vocabulary become what
    the vocabulary's policy makes of them (an emoji nothing, a non-Latin letter a space) and, as in the
    training text, runs of spaces one. When the prompt ends in such a character, the model would go on
    from the visible text before it and its first word would run into the emoji ("Tremendous 😀problems.").
    So the trailing whitespace comes off what it reads and becomes the separator instead: a space, or a
    newline where the visible text ended a line or nothing of the prompt is visible.
    """
    text = normalize_prompt(prompt, options)
    seen = vocab.decode(vocab.encode(text))
    if options.collapse_whitespace:
        seen = _SPACES.sub(" ", seen)
    hidden_end = text[-1:].strip() and not vocab.decode(vocab.encode(text[-1])).strip()
    if not hidden_end:
        return vocab.encode(seen), ""
    visible = seen.rstrip()
    separator = "\n" if not visible or "\n" in seen[len(visible) :] else " "
    return vocab.encode(visible), separator if separator in vocab.index else ""


class Vocab:
    """Characters <-> token ids. Characters outside the vocabulary follow `unknown_policy`.

    - "nearest" (default): fold the character to its closest ASCII form (é -> e) when that is in
      the vocabulary, else treat it as "space" (letters) or "skip" (everything else).
    - "space": replace it with a space (when the vocabulary has one).
    - "skip": drop it.
    """

    def __init__(self, chars: Sequence[str], unknown_policy: str = "nearest") -> None:
        if unknown_policy not in UNKNOWN_POLICIES:
            raise ValueError(
                f"unknown-character policy must be one of {', '.join(UNKNOWN_POLICIES)}, not {unknown_policy!r}"
            )
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("vocabulary must be a list of distinct single characters")
        self.chars = list(chars)
        self.unknown_policy = unknown_policy
        self.index = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str, unknown_policy: str = "nearest") -> Vocab:
        return cls(sorted(set(text)), unknown_policy)

    def __len__(self) -> int:
        return len(self.chars)

    def _substitute(self, ch: str) -> str:
        """What an out-of-vocabulary character becomes; may be '' (dropped)."""
        if self.unknown_policy == "nearest":
            folded = unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode()
            if folded and all(c in self.index for c in folded):
                return folded
            if not ch.isalpha():
                return ""
        if self.unknown_policy in ("space", "nearest") and " " in self.index:
            return " "
        return ""

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for ch in text:
            token = self.index.get(ch)
            if token is not None:
                ids.append(token)
            else:
                ids.extend(self.index[c] for c in self._substitute(ch))
        return ids

    def count_unknown(self, text: str) -> int:
        return sum(1 for ch in text if ch not in self.index)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_meta(self) -> dict:
        return {"vocab": self.chars, "unknown_policy": self.unknown_policy}

    @classmethod
    def from_meta(cls, meta: dict) -> Vocab:
        return cls(meta["vocab"], meta.get("unknown_policy", "nearest"))


def text_to_ids(text: str, vocab: Vocab, cleaning: CleaningOptions) -> tuple[list[int], int]:
    """Clean text the way the training text was cleaned; returns token ids and the out-of-vocabulary count."""
    cleaned = clean_text(text, cleaning)
    return vocab.encode(cleaned), vocab.count_unknown(cleaned)
