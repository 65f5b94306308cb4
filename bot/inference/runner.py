"""Loading a speechbot model file and running its graphs: validation, provider choice, prime and chunks.

The file's contract graph (tokens [batch, seq], state) -> (logits, state) primes prompts. Text is then
written by the chunk graph (bot.inference.chunk_graph), built from the contract graph at load time: it samples
and steps CHUNK characters per call, for every row of a batch, with each row's own settings. An int8 file's
graph is first put in the weight layout this CPU multiplies exactly and fastest (bot.inference.int8_weights).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bot.inference.api import PROVIDER_CHOICES, PROVIDERS
from bot.inference.chunk_graph import ChunkGraphError, chunk_graph, features_used
from bot.inference.int8_weights import Int8WeightsError, serving_layout, stored_layout, to_layout
from bot.inference.modelcheck import external_data_problem, operator_problem, parse_model, read_model_bytes
from bot.inference.modelfile import (
    CUDA_MODEL_PATH,
    CUDA_TWIN_SUFFIX,
    MetadataError,
    ModelFileError,
    ModelInfo,
    cuda_twin,
    parse_props,
    state_names,
)

log = logging.getLogger(__name__)


class ProviderError(ValueError):
    """An execution provider that is unavailable or cannot run this model."""


def serving_path(path: str | Path, choice: str, available: Sequence[str] | None = None) -> Path:
    """The file to serve for `path` under the provider choice: `path` itself, or its CUDA twin.

    The bundled voices are int8, which only the CPU provider runs, so each comes with a CUDA twin
    (modelfile.cuda_twin: `X-cuda.onnx` beside `X.onnx`, the same network as fp32). Where the CUDA provider
    will serve (`cuda`, or `auto` with CUDA among the `available` providers, onnxruntime's by default), a
    file with a twin beside it is served as the twin; any other file is served as it is, and
    choose_provider judges it.
    """
    path = Path(path)
    available = ort.get_available_providers() if available is None else available
    wants_cuda = choice == "cuda" or (choice == "auto" and PROVIDERS["cuda"] in available)
    if wants_cuda and cuda_twin(path).is_file():
        return cuda_twin(path)
    return path


def choose_provider(choice: str, precision: str) -> str:
    """The provider name to use, or a ProviderError that says what to do instead."""
    if choice not in PROVIDER_CHOICES:
        raise ProviderError(f"providers must be one of {', '.join(PROVIDER_CHOICES)}, not {choice!r}")
    has_cuda = PROVIDERS["cuda"] in ort.get_available_providers()
    if choice == "cuda" and not has_cuda:
        raise ProviderError(
            "the CUDA provider was asked for, but this onnxruntime has none; install onnxruntime-gpu "
            "on a machine with an NVIDIA GPU, or use providers 'cpu'"
        )
    if precision == "int8" and choice == "cuda":
        raise ProviderError(
            "int8 models run on the CPU provider; use an fp32 or fp16 export with 'cuda' "
            f"(a file's is served on CUDA when it lies beside it as NAME{CUDA_TWIN_SUFFIX}.onnx, as the bundled "
            f"voices' do, e.g. {CUDA_MODEL_PATH.name})"
        )
    use_cuda = choice == "cuda" or (choice == "auto" and has_cuda and precision != "int8")
    if precision == "fp16" and not use_cuda:
        # onnxruntime has no fp16 LSTM kernel on CPU; opening such a graph there can crash the process.
        raise ProviderError(
            "this is an fp16 model, which runs only on the CUDA provider and none is available; "
            "use an fp32 or int8 export (`python -m export CKPT -o model.onnx --int8`) on CPU"
        )
    return PROVIDERS["cuda" if use_cuda else "cpu"]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it): one session each."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def session_options(threads: int | None) -> ort.SessionOptions:
    """Settings for a server process: a fixed number of threads that sleep when idle."""
    options = ort.SessionOptions()
    # One thread is the default: lanes, not threads, use the other cores (docs/engine.md, "Loading, providers
    # and threads"); fp32 models on bigger machines may gain from more.
    options.intra_op_num_threads = threads or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads would burn the cores that the bot's event loop and the database need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def read_model_info(path: str | Path) -> tuple[bytes, ModelInfo]:
    """The file's bytes and validated metadata, or a ModelFileError naming what is wrong.

    The file is read once, here, and checked against the model file's contract (bot.inference.modelcheck)
    before any onnxruntime session sees it: sessions are then made from these bytes, never from the path.
    """
    path = Path(path)
    data = read_model_bytes(path)
    model = parse_model(path, data)
    # First, before anything reads the file's contents further: a file that points outside itself.
    if problem := external_data_problem(model):
        raise ModelFileError(f"{path} is refused: {problem}")
    try:
        info = parse_props({prop.key: prop.value for prop in model.metadata_props})
    except MetadataError as exc:
        raise ModelFileError(f"{path} is not a speechbot model: {exc}") from exc
    if problem := operator_problem(model, info.precision):
        raise ModelFileError(f"{path} is refused: {problem}")
    del model  # the session parses the bytes itself; the bot keeps only them
    probe_options = ort.SessionOptions()
    # Without graph optimisation the CPU provider can open any graph, fp16 included, just to read it.
    probe_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    probe_options.log_severity_level = 4
    try:
        probe = ort.InferenceSession(data, probe_options, providers=[PROVIDERS["cpu"]])
    except Exception as exc:  # onnxruntime raises several types for a bad file
        reason = str(exc).strip().splitlines()[0][:300]
        raise ModelFileError(f"{path} is not a readable ONNX model (truncated or corrupt?): {reason}") from exc
    state_in, state_out = state_names(info.is_lstm)
    inputs = [i.name for i in probe.get_inputs()]
    outputs = [o.name for o in probe.get_outputs()]
    if inputs != ["tokens", *state_in] or outputs != ["logits", *state_out]:
        raise ModelFileError(f"{path} has inputs {inputs} and outputs {outputs}, not those of a speechbot model")
    _check_graph_matches_metadata(path, info, probe)
    return data, info


def _check_graph_matches_metadata(path: Path, info: ModelInfo, probe: ort.InferenceSession) -> None:
    """Compare the graph's fixed dimensions with what model_config and the vocabulary promise.

    Otherwise a mismatch (an edited or hand-assembled file) surfaces as onnxruntime's InvalidArgument
    on the first request, long after start.
    """
    layers, _, hidden = info.state_shape(1)
    state_in, state_out = state_names(info.is_lstm)
    expected = {name: [layers, "batch", hidden] for name in [*state_in, *state_out]}
    expected["logits"] = ["batch", "seq", len(info.vocab)]
    for node in [*probe.get_inputs(), *probe.get_outputs()]:
        want = expected.get(node.name)
        if want is None:
            continue
        # Symbolic dimensions (names or None) cannot be compared here; the trial run in ModelRunner covers them.
        pairs = zip(node.shape, want, strict=False)
        if len(node.shape) != len(want) or any(isinstance(have, int) and have != need for have, need in pairs):
            raise ModelFileError(
                f"{path}'s metadata does not match its graph: {node.name} is {_dims(node.shape)} in the graph, but "
                f"model_config ({layers} layers of {hidden} units, {len(info.vocab)} characters) means {_dims(want)}; "
                "re-export the model with `python -m export`"
            )


def _dims(shape: list) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


class ModelRunner:
    """One validated model file: its sessions, metadata and provider. Not thread-safe; one owner."""

    def __init__(
        self, path: str | Path, providers: str = "auto", threads: int | None = None, int8_weights: str = "auto"
    ) -> None:
        """`int8_weights` (INT8_WEIGHT_CHOICES): the layout an int8 file's weights are served in; "auto"
        picks the one this CPU multiplies exactly and fastest (bot.inference.int8_weights)."""
        self.path = serving_path(path, providers)
        if self.path != Path(path):
            log.info("%s has a CUDA twin beside it: serving %s on CUDA", path, self.path)
        path = self.path
        data, self.info = read_model_info(path)
        self._options = session_options(threads)
        self._providers = [choose_provider(providers, self.info.precision)]
        # The layout the int8 graph's weights are served in (None for other precisions), and the file's own.
        self.int8_weights: str | None = None
        stored = None
        if self.info.precision == "int8":
            data, self.int8_weights, stored = self._int8_data(data, int8_weights)
        self.session = ort.InferenceSession(data, self._options, providers=self._providers)
        self.provider = self.session.get_providers()[0]
        self.state_names, _ = state_names(self.info.is_lstm)
        # Each optional sampler step costs nodes per character, so a batch runs the graph with only the
        # steps its rows use (bot.inference.chunk_graph.FEATURES). Each graph holds a copy of the weights (~45 MB
        # for the bundled model) and is built when a batch first needs it; the file's bytes are kept for that.
        self._data = data
        self._chunk_sessions = {frozenset(): self._chunk_session(frozenset())}
        try:
            logits, state = self.prime(np.zeros((1, 1), np.int64), self.zero_state(1))
        except Exception as exc:  # onnxruntime's error types are not exported in one place
            reason = str(exc).strip().splitlines()[0][:300]
            raise ModelFileError(f"{path} does not run as its metadata describes: {reason}") from exc
        self._check_step_shapes(logits, state)
        kind = self.info.model_config["model_type"]
        storage = self.info.weight_storage
        precision = (
            self.info.precision if storage == self.info.precision else f"{self.info.precision}, {storage} weights"
        )
        if self.int8_weights is not None:
            precision = f"int8, {self.int8_weights} weights" + (
                f", converted from the file's {stored}" if stored else ""
            )
        log.info(
            "loaded %s (%s, %s) on %s",
            path,
            f"ensemble of {self.info.members} {kind}s" if self.info.members > 1 else kind,
            precision,
            self.provider,
        )

    def _int8_data(self, data: bytes, asked: str) -> tuple[bytes, str, str | None]:
        """The int8 file's bytes in the layout to serve, that layout, and the file's own where it differs."""
        layout = serving_layout(asked)
        model = onnx.load_from_string(data)
        try:
            # What the graph holds, not what its metadata claim: that is what onnxruntime multiplies.
            stored = stored_layout(model)
            if stored == layout:
                return data, layout, None
            return to_layout(model, layout).SerializeToString(), layout, stored
        except Int8WeightsError as exc:
            raise ModelFileError(f"{self.path} cannot be served with {layout} weights: {exc}") from exc

    def _check_step_shapes(self, logits: np.ndarray, state: list[np.ndarray]) -> None:
        """The shapes of one real step against the metadata's: they cover the dimensions that the graph
        leaves symbolic (read_model_info compares only fixed ones), which would otherwise fail every speech."""
        expected = [(1, 1, len(self.info.vocab)), *[self.info.state_shape(1)] * len(state)]
        for name, value, want in zip(["logits", *self.state_names], [logits, *state], expected, strict=True):
            if value.shape != want:
                raise ModelFileError(
                    f"{self.path}'s metadata does not match its graph: one step writes {name} of shape "
                    f"{_dims(list(value.shape))}, but model_config ({self.info.num_layers * self.info.members} "
                    f"layers of {self.info.rnn_size} units, {len(self.info.vocab)} characters) means "
                    f"{_dims(list(want))}; re-export the model with `python -m export`"
                )

    def _chunk_session(self, features: frozenset[str]) -> ort.InferenceSession:
        contract = onnx.load_from_string(self._data)
        try:
            graph = chunk_graph(contract, len(self.info.vocab), self.info.is_lstm, features)
        except ChunkGraphError as exc:
            raise ModelFileError(f"{self.path} cannot be served: {exc}") from exc
        return ort.InferenceSession(graph.SerializeToString(), self._options, providers=self._providers)

    def zero_state(self, batch: int) -> list[np.ndarray]:
        return [np.zeros(self.info.state_shape(batch), np.float32) for _ in self.state_names]

    def prime(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Contract graph: tokens [batch, seq] and state -> logits [batch, seq, vocab] and the new state."""
        feed = {"tokens": tokens, **dict(zip(self.state_names, state, strict=True))}
        logits, *new_state = self.session.run(None, feed)
        return logits, new_state

    def sample(
        self, logits: np.ndarray, state: list[np.ndarray], rows: Mapping[str, np.ndarray], uniforms: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
        """Chunk graph: one character per uniform for each row.

        logits [batch, vocab] (the next character's), state (each [layers, batch, hidden]), the rows'
        settings by chunk-graph input name, each [batch]: `temperature` float32 and any of `top_k` int64
        (0: no limit, else below the vocabulary size), `top_p` and `min_p` float32, `repetition_penalty`
        float32 with `repeat_ngram` int64, `history` and `matches` int64 [batch, window]
        (model.sampling.repetition_start); uniforms [batch, chunk] float32 in [0, 1)
        (bot.inference.chunk_graph says how they pick a token) -> tokens [batch, chunk], the logits after them,
        the new state and the new (history, matches) (those given, unchanged, without a penalty).
        """
        features = features_used(rows)
        if features not in self._chunk_sessions:
            log.info("building the chunk graph with %s", ", ".join(sorted(features)))
            self._chunk_sessions[features] = self._chunk_session(features)
        session = self._chunk_sessions[features]
        given = {
            "logits": logits,
            **dict(zip(self.state_names, state, strict=True)),
            **rows,
            "uniforms": uniforms,
        }
        feed = {i.name: given[i.name] for i in session.get_inputs()}
        tokens, next_logits, *rest = session.run(None, feed)
        new_state = rest[: len(self.state_names)]
        if "repetition" in features:
            history = (rest[-2], rest[-1])
        else:
            history = (rows["history"], rows["matches"]) if "history" in rows else None
        return tokens, next_logits, new_state, history
