"""The speechbot model-file format: its metadata and their validation, state names, the int8 Loop's node names.

The bot owns the format it serves; `export/` writes files by importing this module, and the bot never
imports `export/` (whose modules need torch). Torch- and onnx-free.

Everything the bot needs to turn a prompt into token ids and back travels inside the .onnx file as
`metadata_props`, so a model file can never be paired with the wrong vocabulary or normalisation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.sampling import BOT_SAMPLING
from model.text import CleaningOptions, Vocab, text_to_ids

# The bundled voices (docs/voices.md), the default one first. Each comes twice: int8 for the CPU provider,
# and the same network dequantized to fp32 as its CUDA twin, for the CUDA provider, whose LSTM kernels have
# no int8 (docs/default-model.md). runner.serving_path picks one.
ASSETS = Path(__file__).parent.parent / "assets"
DEFAULT_MODEL_PATH = ASSETS / "speechbot.onnx"
DEFAULT_MODEL_PATHS = (DEFAULT_MODEL_PATH, ASSETS / "speeches.onnx")
CUDA_TWIN_SUFFIX = "-cuda"  # X-cuda.onnx beside X.onnx is X's network for the CUDA provider
FORMAT_VERSION = "1"
PRECISIONS = ("fp32", "int8", "fp16")
# An fp32 file may store its recurrent weights as fp16 (`python -m export --fp16-weights`), cast back to
# fp32 when onnxruntime opens it: the metadata key says so, and the arithmetic stays fp32.
WEIGHT_STORAGE_KEY = "weight_storage"
FP16_WEIGHTS = "fp16-weights"

# Names of the int8 graph's nodes (export.int8_lstm), by which bot.inference.chunk_graph rewires its Loop:
# the Loop over the sequence, the body's Gather of the step's token, the Transpose of the scanned logits.
INT8_LOOP = "int8_loop"
INT8_READ_TOKEN = "int8_read_token"
INT8_LOGITS_BATCH_FIRST = "int8_logits_batch_first"
# How an int8 file stores its weight matrices, in this metadata key: INT8_UNSIGNED_WEIGHTS (uint8 with zero
# point INT8_WEIGHT_ZERO, the initializer INT8_WEIGHT_ZERO_NAME). Files without the key store int8 weights.
# The runner serves either in the layout the CPU multiplies exactly and fastest (bot.inference.int8_weights).
INT8_WEIGHTS = "int8_weights"
INT8_UNSIGNED_WEIGHTS = "uint8-zero-128"
INT8_WEIGHT_ZERO = 128
INT8_WEIGHT_ZERO_NAME = "weight_zero"


def cuda_twin(path: Path) -> Path:
    """Where the CUDA twin of the model file `path` would be (it need not exist)."""
    return path.with_name(path.stem + CUDA_TWIN_SUFFIX + path.suffix)


CUDA_MODEL_PATH = cuda_twin(DEFAULT_MODEL_PATH)


def is_cuda_twin(path: Path) -> bool:
    """Whether `path` is the CUDA twin of a model file beside it."""
    base = path.stem.removesuffix(CUDA_TWIN_SUFFIX)
    return base != path.stem and path.with_name(base + path.suffix).is_file()


# A voice's name, as users type it after /voice (and metadata keys that give it and a one-line description).
VOICE_NAME_KEY = "voice_name"
VOICE_DESCRIPTION_KEY = "voice_description"
VOICE_NAME_FORMAT = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
VOICE_NAME_RULE = "1-32 of a-z 0-9 _ -, starting with a letter or digit"
VOICE_DESCRIPTION_MAX = 200
# The least min-p the bot's sampling loosens to for this model at high temperatures (model.sampling.bot_sampling):
# a voice that writes too few real words at temperature 2 with the bot's own schedule gets a higher one.
MIN_P_FLOOR_KEY = "min_p_floor"
MIN_P_FLOOR_MAX = BOT_SAMPLING.min_p  # the schedule starts there: a higher floor would tighten the bot's default


def voice_name_from_file(path: Path) -> str:
    """The voice name of a model file whose metadata gives none: its file name, made typeable."""
    name = re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-_")[:32]
    return name or "voice"


def state_names(is_lstm: bool) -> tuple[list[str], list[str]]:
    """The contract graph's recurrent-state inputs and outputs: h (and c for an LSTM)."""
    return (["h0", "c0"], ["h", "c"]) if is_lstm else (["h0"], ["h"])


REQUIRED_KEYS = (
    "speechbot_format",
    "vocab",
    "cleaning",
    "unknown_policy",
    "model_config",
    "corpus_sha256",
    "val_bpc",
    "exporter_version",
)


class ModelFileError(ValueError):
    """A model file that is missing, unreadable, not a speechbot export, or outside the model file's contract."""


class MetadataError(ValueError):
    """Metadata that is missing or malformed: the file is not a speechbot model."""


@dataclass(frozen=True)
class ModelInfo:
    vocab: list[str]
    cleaning: dict
    unknown_policy: str
    model_config: dict
    corpus_sha256: list[str]
    val_bpc: float | None
    exporter_version: str
    precision: str = "fp32"
    extra: dict = field(default_factory=dict)

    @property
    def is_lstm(self) -> bool:
        return self.model_config["model_type"] == "lstm"

    @property
    def num_layers(self) -> int:
        return int(self.model_config["num_layers"])

    @property
    def rnn_size(self) -> int:
        return int(self.model_config["rnn_size"])

    @property
    def members(self) -> int:
        """Networks averaged in the file (model.ensemble); their states are stacked along the layer axis."""
        return int(self.model_config.get("members", 1))

    @property
    def weight_storage(self) -> str:
        """How the weights are stored in the file: as its precision says, or fp16 in an fp32 file."""
        return self.extra.get(WEIGHT_STORAGE_KEY, self.precision)

    @property
    def voice_name(self) -> str | None:
        """The voice name its exporter gave it (`python -m export --voice-name`), if any."""
        return self.extra.get(VOICE_NAME_KEY)

    @property
    def min_p_floor(self) -> float:
        """The least min-p the bot samples this model with (0: the bot's schedule alone); see MIN_P_FLOOR_KEY."""
        return float(self.extra.get(MIN_P_FLOOR_KEY, 0.0))

    @property
    def voice_description(self) -> str:
        """Its one-line description for /voice; empty if its exporter gave none."""
        return self.extra.get(VOICE_DESCRIPTION_KEY, "")

    def state_shape(self, batch: int) -> tuple[int, int, int]:
        """Shape of each recurrent-state input and output: [layers of all members, batch, hidden]."""
        return (self.num_layers * self.members, batch, self.rnn_size)

    def text_ids(self, text: str) -> tuple[np.ndarray, int]:
        """Token ids of `text` cleaned like the training text, and how many characters were outside the vocabulary."""
        vocab = Vocab(self.vocab, self.unknown_policy)
        ids, unknown = text_to_ids(text, vocab, CleaningOptions.from_dict(self.cleaning))
        return np.array(ids, dtype=np.int64), unknown

    def to_props(self) -> dict[str, str]:
        """The string key/value pairs stored as ONNX metadata_props."""
        return {
            "speechbot_format": FORMAT_VERSION,
            "vocab": json.dumps(self.vocab, ensure_ascii=False),
            "cleaning": json.dumps(self.cleaning, sort_keys=True),
            "unknown_policy": self.unknown_policy,
            "model_config": json.dumps(self.model_config, sort_keys=True),
            "corpus_sha256": json.dumps(self.corpus_sha256),
            "val_bpc": "" if self.val_bpc is None else repr(float(self.val_bpc)),
            "exporter_version": self.exporter_version,
            "precision": self.precision,
            **self.extra,
        }


def _json_field(props: dict[str, str], key: str, kind: type):
    try:
        value = json.loads(props[key])
    except json.JSONDecodeError as exc:
        raise MetadataError(f"metadata field {key!r} is not valid JSON ({exc})") from exc
    if not isinstance(value, kind):
        raise MetadataError(f"metadata field {key!r} must be a JSON {kind.__name__}")
    return value


def check_voice(name: str | None, description: str, min_p_floor: str | None = None) -> None:
    """A MetadataError unless `name` (None: none given), `description` and `min_p_floor` (None: none) can
    describe a voice."""
    if name is not None and not VOICE_NAME_FORMAT.fullmatch(name):
        raise MetadataError(f"its {VOICE_NAME_KEY} {name!r} is not valid: use {VOICE_NAME_RULE}")
    if len(description) > VOICE_DESCRIPTION_MAX or "\n" in description:
        raise MetadataError(
            f"its {VOICE_DESCRIPTION_KEY} must be one line of at most {VOICE_DESCRIPTION_MAX} characters"
        )
    if min_p_floor is None:
        return
    try:
        floor = float(min_p_floor)
    except ValueError:
        floor = -1.0
    if not 0 <= floor <= MIN_P_FLOOR_MAX:
        raise MetadataError(f"its {MIN_P_FLOOR_KEY} {min_p_floor!r} is not a number from 0 to {MIN_P_FLOOR_MAX:g}")


def parse_props(props: dict[str, str]) -> ModelInfo:
    """Validate metadata_props read from a file and turn them into a ModelInfo."""
    if "speechbot_format" not in props:
        raise MetadataError("it has no speechbot metadata, so it was not made by `python -m export`")
    if props["speechbot_format"] != FORMAT_VERSION:
        raise MetadataError(
            f"its speechbot format is {props['speechbot_format']!r}; this version reads format {FORMAT_VERSION!r}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in props]
    if missing:
        raise MetadataError(f"its metadata lacks {', '.join(missing)}")
    vocab = _json_field(props, "vocab", list)
    if not vocab or any(not isinstance(ch, str) or len(ch) != 1 for ch in vocab) or len(set(vocab)) != len(vocab):
        raise MetadataError("its vocabulary must be a non-empty list of distinct single characters")
    config = _json_field(props, "model_config", dict)
    for key in ("model_type", "num_layers", "rnn_size", "vocab_size"):
        if key not in config:
            raise MetadataError(f"its model_config lacks {key!r}")
    if config["vocab_size"] != len(vocab):
        raise MetadataError(f"its model_config says {config['vocab_size']} tokens but the vocabulary has {len(vocab)}")
    for key in ("num_layers", "rnn_size", "members"):
        value = config.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MetadataError(f"its model_config {key!r} must be a positive whole number, not {value!r}")
    precision = props.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise MetadataError(f"its precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    storage = props.get(WEIGHT_STORAGE_KEY)
    if storage is not None and (storage != "fp16" or precision != "fp32"):
        raise MetadataError(
            f"its {WEIGHT_STORAGE_KEY} {storage!r} is not valid: only an fp32 file stores 'fp16' weights"
        )
    check_voice(props.get(VOICE_NAME_KEY), props.get(VOICE_DESCRIPTION_KEY, ""), props.get(MIN_P_FLOOR_KEY))
    try:
        val_bpc = float(props["val_bpc"]) if props["val_bpc"] else None
    except ValueError as exc:
        raise MetadataError(f"its val_bpc {props['val_bpc']!r} is not a number") from exc
    known = {*REQUIRED_KEYS, "precision"}
    return ModelInfo(
        vocab=vocab,
        cleaning=_json_field(props, "cleaning", dict),
        unknown_policy=props["unknown_policy"],
        model_config=config,
        corpus_sha256=_json_field(props, "corpus_sha256", list),
        val_bpc=val_bpc,
        exporter_version=props["exporter_version"],
        precision=precision,
        extra={k: v for k, v in props.items() if k not in known},
    )
