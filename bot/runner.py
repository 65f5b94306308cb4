"""Loading a speechbot model file and running its graph: validation, provider choice, prime and step.

The contract graph (tokens [batch, seq], state) -> (logits, state) primes prompts. For the batch's
one-character steps an int8 model also gets a step graph: the same nodes as the body of the contract
graph's Loop, extracted at load time (export.int8_lstm.step_graph), which skips the Loop and the state
reshaping around it. Its state is each layer's c and quantized h; its results are bitwise those of
the contract graph, so either path gives the same text for a seed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export.int8_lstm import quantize_graph, step_graph
from export.metadata import MetadataError, ModelInfo, parse_props, state_names

log = logging.getLogger(__name__)

DEFAULT_MODEL_PATH = Path(__file__).parent / "assets" / "speechbot.onnx"
PROVIDER_CHOICES = ("auto", "cpu", "cuda")
_PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ModelFileError(ValueError):
    """A model file that is missing, unreadable, or not a speechbot export."""


class ProviderError(ValueError):
    """An execution provider that is unavailable or cannot run this model."""


def choose_provider(choice: str, precision: str) -> str:
    """The provider name to use, or a ProviderError that says what to do instead."""
    if choice not in PROVIDER_CHOICES:
        raise ProviderError(f"providers must be one of {', '.join(PROVIDER_CHOICES)}, not {choice!r}")
    has_cuda = _PROVIDER_NAMES["cuda"] in ort.get_available_providers()
    if choice == "cuda" and not has_cuda:
        raise ProviderError(
            "the CUDA provider was asked for, but this onnxruntime has none; install onnxruntime-gpu "
            "on a machine with an NVIDIA GPU, or use providers 'cpu'"
        )
    if precision == "int8" and choice == "cuda":
        raise ProviderError("int8 models run on the CPU provider; use an fp32 or fp16 export with 'cuda'")
    use_cuda = choice == "cuda" or (choice == "auto" and has_cuda and precision != "int8")
    if precision == "fp16" and not use_cuda:
        # onnxruntime has no fp16 LSTM kernel on CPU; opening such a graph there can crash the process.
        raise ProviderError(
            "this is an fp16 model, which runs only on the CUDA provider and none is available; "
            "use an fp32 or int8 export (`python -m export CKPT -o model.onnx --int8`) on CPU"
        )
    return _PROVIDER_NAMES["cuda" if use_cuda else "cpu"]


def session_options(threads: int | None) -> ort.SessionOptions:
    """Settings for a server process: a fixed number of threads that sleep when idle."""
    options = ort.SessionOptions()
    # One thread measured fastest for a single int8 stream and as fast for batches on 2 cores;
    # fp32 models on bigger machines may gain from more.
    options.intra_op_num_threads = threads or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads would burn the cores that the bot's event loop and the database need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def read_model_info(path: str | Path) -> tuple[bytes, ModelInfo]:
    """The file's bytes and validated metadata, or a ModelFileError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(
            f"model file {path} does not exist; export one with `python -m export CHECKPOINT -o {path}`"
        )
    data = path.read_bytes()
    if not data:
        raise ModelFileError(f"model file {path} is empty")
    probe_options = ort.SessionOptions()
    # Without graph optimisation the CPU provider can open any graph, fp16 included, just to read it.
    probe_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    probe_options.log_severity_level = 4
    try:
        probe = ort.InferenceSession(data, probe_options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several types for a bad file
        reason = str(exc).strip().splitlines()[0][:300]
        raise ModelFileError(f"{path} is not a readable ONNX model (truncated or corrupt?): {reason}") from exc
    try:
        info = parse_props(probe.get_modelmeta().custom_metadata_map)
    except MetadataError as exc:
        raise ModelFileError(f"{path} is not a speechbot model: {exc}") from exc
    state_in, state_out = state_names(info.is_lstm)
    inputs = [i.name for i in probe.get_inputs()]
    outputs = [o.name for o in probe.get_outputs()]
    if inputs != ["tokens", *state_in] or outputs != ["logits", *state_out]:
        raise ModelFileError(f"{path} has inputs {inputs} and outputs {outputs}, not those of a speechbot model")
    return data, info


class ModelRunner:
    """One validated model file: its sessions, metadata and provider. Not thread-safe; one owner."""

    def __init__(
        self, path: str | Path, providers: str = "auto", threads: int | None = None, fast_step: bool = True
    ) -> None:
        data, self.info = read_model_info(path)
        options = session_options(threads)
        self.session = ort.InferenceSession(data, options, providers=[choose_provider(providers, self.info.precision)])
        self.provider = self.session.get_providers()[0]
        self.state_names, _ = state_names(self.info.is_lstm)
        self._step_session = self._quantize_session = None
        if fast_step and self.info.precision == "int8":
            model = onnx.load_from_string(data)
            try:
                step = step_graph(model)
            except ValueError as exc:  # an int8 graph of another layout still runs through the contract
                log.info("no step graph for %s (%s); stepping with the contract graph", path, exc)
            else:
                cpu = [_PROVIDER_NAMES["cpu"]]
                self._step_session = ort.InferenceSession(step.SerializeToString(), options, providers=cpu)
                self._quantize_session = ort.InferenceSession(
                    quantize_graph(model).SerializeToString(), options, providers=cpu
                )
                self._step_inputs = [i.name for i in self._step_session.get_inputs()]
        kind = self.info.model_config["model_type"]
        log.info(
            "loaded %s (%s, %s) on %s%s",
            path,
            f"ensemble of {self.info.members} {kind}s" if self.info.members > 1 else kind,
            self.info.precision,
            self.provider,
            ", with a step graph" if self.uses_step_graph else "",
        )

    @property
    def uses_step_graph(self) -> bool:
        return self._step_session is not None

    def zero_state(self, batch: int) -> list[np.ndarray]:
        return [np.zeros(self.info.state_shape(batch), np.float32) for _ in self.state_names]

    def prime(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Contract graph: tokens [batch, seq] and state -> logits [batch, seq, vocab] and the new state."""
        feed = {"tokens": tokens, **dict(zip(self.state_names, state, strict=True))}
        logits, *new_state = self.session.run(None, feed)
        return logits, new_state

    def step_state(self, state: list[np.ndarray]) -> list[np.ndarray]:
        """A state from prime() in the form step() takes: [c, quantized h] with a step graph, else unchanged."""
        if not self.uses_step_graph:
            return state
        h, c = state
        return [c, self._quantize_session.run(None, {"h": h})[0]]

    def step(self, tokens: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One character for each row: tokens [batch] and a step_state() -> logits [batch, vocab] and the new state.

        Every state array is [layers, batch, hidden], so a batch is joined and split along axis 1.
        """
        if not self.uses_step_graph:
            logits, state = self.prime(tokens[:, None], state)
            return logits[:, 0], state
        layers = self.info.state_shape(0)[0]
        c, hq = state
        feed = dict(zip(self._step_inputs, [tokens, *c, *hq], strict=True))
        logits, *parts = self._step_session.run(None, feed)
        return logits, [np.stack(parts[:layers]), np.stack(parts[layers:])]
