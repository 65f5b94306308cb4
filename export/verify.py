"""Check an exported graph against the PyTorch network before the file is written."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from bot.inference.modelfile import ModelInfo, state_names
from export.evaluate import onnx_nats
from model.ensemble import Ensemble
from model.evaluate import evaluate_ids
from model.model import CharRNN

FP32_TOLERANCE = 1e-4
# Quantized variants are judged by what users see, the bits per character, not by logits.
INT8_MAX_BPC_INCREASE = 0.05
# fp32 arithmetic on fp16-rounded weights (--fp16-weights): its bits/char must move by less than this either way.
FP16_WEIGHTS_MAX_BPC_CHANGE = 1e-4
SHAPES = ((1, 1), (1, 100), (8, 1), (8, 100))  # (batch, seq)
# Scored when no --text is given: enough ordinary English to exercise the common characters.
SAMPLE_TEXT = (
    "Thank you very much. We are going to make America great again, believe me. We're going to win, "
    "and we're going to win so much. Our country doesn't win anymore! Who is going to pay for the wall? "
    "It's true, folks: jobs, trade, the economy, the military. 2016 is the year.\n"
)


class VerificationError(ValueError):
    """The exported graph does not compute what the PyTorch network computes."""


@dataclass
class Verification:
    max_logit_diff: float
    torch_bpc: float
    onnx_bpc: float

    @property
    def bpc_change(self) -> float:
        return self.onnx_bpc - self.torch_bpc


def _cases(net: CharRNN | Ensemble, corpus_ids: np.ndarray, rng: np.random.Generator):
    """Random tokens from a random state, and corpus windows from a zero state, for every shape."""
    for batch, seq in SHAPES:
        zero = net.initial_state(batch)
        state_shape = (zero[0] if net.is_lstm else zero).shape
        random_state = [np.tanh(rng.standard_normal(state_shape)).astype(np.float32) for _ in range(1 + net.is_lstm)]
        yield rng.integers(0, net.config.vocab_size, (batch, seq)), random_state
        starts = rng.integers(0, max(1, len(corpus_ids) - seq), batch)
        windows = np.stack([np.resize(corpus_ids[s : s + seq], seq) for s in starts])
        yield windows, [np.zeros(state_shape, np.float32) for _ in range(1 + net.is_lstm)]


@torch.no_grad()
def max_logit_difference(
    net: CharRNN | Ensemble, session: ort.InferenceSession, corpus_ids: np.ndarray, seed: int = 0
) -> float:
    state_in, _ = state_names(net.is_lstm)
    worst = 0.0
    for tokens, state in _cases(net, corpus_ids, np.random.default_rng(seed)):
        torch_state = tuple(torch.from_numpy(s) for s in state)
        expected, _ = net(torch.from_numpy(tokens), torch_state if net.is_lstm else torch_state[0])
        (got,) = session.run(["logits"], {"tokens": tokens, **dict(zip(state_in, state, strict=True))})
        worst = max(worst, float(np.abs(expected.numpy() - got).max()))
    return worst


def verify(
    net: CharRNN | Ensemble, model_bytes: bytes, info: ModelInfo, corpus_ids: np.ndarray, providers: list[str]
) -> Verification:
    """Compare logits and bits per character; raise VerificationError if fp32, fp16 weights or int8 is off.

    fp16-rounded weights move logits by more than fp32's tolerance (by up to 0.03 on the bundled model), so
    like int8 they are judged by the bits per character, here within FP16_WEIGHTS_MAX_BPC_CHANGE.
    """
    session = ort.InferenceSession(model_bytes, providers=providers)
    diff = max_logit_difference(net, session, corpus_ids)
    result = Verification(
        diff, evaluate_ids(net, corpus_ids)[0] / np.log(2), onnx_nats(session, info, corpus_ids) / np.log(2)
    )
    fp16_weights = info.weight_storage == "fp16" and info.precision == "fp32"
    if fp16_weights and not abs(result.bpc_change) <= FP16_WEIGHTS_MAX_BPC_CHANGE:
        raise VerificationError(
            f"fp16 weights change the bits/char by {result.bpc_change:+.5f} "
            f"(allowed ±{FP16_WEIGHTS_MAX_BPC_CHANGE:g}); export fp32 instead, nothing was written"
        )
    if info.precision == "fp32" and not fp16_weights and not diff <= FP32_TOLERANCE:
        raise VerificationError(
            f"onnxruntime's logits differ from PyTorch's by up to {diff:.3g} (allowed {FP32_TOLERANCE:g}); "
            "the exported graph is wrong, so nothing was written"
        )
    if info.precision == "int8" and not result.bpc_change <= INT8_MAX_BPC_INCREASE:
        raise VerificationError(
            f"int8 quantization costs {result.bpc_change:.3f} bits/char (allowed {INT8_MAX_BPC_INCREASE}); "
            "export fp32 instead, nothing was written"
        )
    return result
