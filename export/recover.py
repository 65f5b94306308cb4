"""`python -m export recover INT8.onnx -o CKPT.pt`: a PyTorch checkpoint rebuilt from an int8 export.

For when the checkpoint an int8 file came from is gone (run folders are not kept). The int8 graph
(export.int8_lstm) stores each LSTM weight as int8 per output column with its float scale, so
`q * scale` gives back the weights the int8 graph multiplies by, exactly. What it does not store
apart is layer 0's input side: the embedding, layer 0's input weights and both layer-0 biases are
folded into one table per gate, table = E @ W_ih0.T + b. That table minus its mean row is
(E - mean(E)) @ W_ih0.T, of rank at most `wordvec_size`, so an SVD splits it back into an embedding and
input weights of the file's own shapes that give the same table (the mean row becomes the bias). They
are not the original matrices (any invertible mix of the embedding's columns gives the same table),
but the network computes the same function. The separate ih and hh biases are likewise only known
as their sum, which goes into bias_ih; bias_hh is zero.

So the checkpoint is the file's network in fp32 with its int8-rounded weights: not the network
before quantization, whose val bits/char differ from it slightly (docs/default-model.md). Its
activations are not quantized, as they are in the int8 graph (fixed scale 1/127), so its logits
differ from the int8 file's a little too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from bot.inference.modelfile import MetadataError, ModelInfo, parse_props
from export.int8_lstm import GATES
from model.checkpoint import Checkpoint
from model.cli import UsageError, check_input_file, check_output_file
from model.dataset import load_dataset
from model.evaluate import evaluate_ids
from model.model import ModelConfig, nats_to_bits

# Singular values of the centred layer-0 table beyond wordvec_size must be this small against the
# largest: float32 rounding of the table leaves about 1e-7; a table of higher rank is not E @ W.T + b.
MAX_RESIDUAL_RANK = 1e-5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export recover",
        description="Rebuild a PyTorch checkpoint (model/checkpoint.py) from an int8 file written by "
        "`python -m export --int8`: its weights dequantized, its metadata as the checkpoint's vocabulary, "
        "cleaning and config. One network, not an ensemble.",
    )
    p.add_argument("model", metavar="INT8.onnx", help="int8 model written by `python -m export --int8`")
    p.add_argument("-o", "--output", required=True, metavar="CKPT.pt", help="checkpoint to write")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="the prepared dataset the model was trained on (its sha256 must match the file's): recorded in the "
        "checkpoint, and its val split scored (one stream) for the checkpoint's val_bpc",
    )
    return p


class _Weights:
    """The int8 file's initializers by name, for one network (ensemble member 0)."""

    def __init__(self, model: onnx.ModelProto, path: Path) -> None:
        self.arrays = {t.name: t for t in model.graph.initializer}
        self.path = path

    def get(self, name: str) -> np.ndarray:
        tensor = self.arrays.get(f"m0_{name}")
        if tensor is None:
            raise UsageError(f"{self.path} has no {name!r} weights: it was not written by this exporter's --int8")
        return numpy_helper.to_array(tensor)

    def matrix(self, name: str) -> np.ndarray:
        """A dequantized [in, out] matrix: the integer weight times its column's scale, in float32 as the graph
        computes. Files of today's layout store the weights as uint8 with zero point 128, older ones as int8."""
        quantized = self.get(f"{name}_q").astype(np.float32)
        if self.arrays[f"m0_{name}_q"].data_type == onnx.TensorProto.UINT8:
            quantized -= 128
        return quantized * self.get(f"{name}_scale").astype(np.float32)


def split_table(table: np.ndarray, wordvec_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embedding [V, E], input weights [4H, E] and bias [4H] whose E @ W.T + bias is `table` [V, 4H].

    The embedding is scaled to entries of RMS 1, the scale nn.Embedding starts from, so that
    fine-tuning or dynamic evaluation of the checkpoint sees weights of the usual size.
    """
    table = table.astype(np.float64)
    bias = table.mean(axis=0)
    u, s, vt = np.linalg.svd(table - bias, full_matrices=False)
    residual = s[wordvec_size:].max(initial=0.0) / s[0]
    if residual > MAX_RESIDUAL_RANK:
        raise UsageError(
            f"layer 0's input table has rank above the embedding size {wordvec_size} (residual {residual:.2g}): "
            "it is not an embedding times input weights"
        )
    embedding = u[:, :wordvec_size] * s[:wordvec_size]
    rms = float(np.sqrt(np.mean(embedding**2)))
    return (
        (embedding / rms).astype(np.float32),
        (vt[:wordvec_size].T * rms).astype(np.float32),
        bias.astype(np.float32),
    )


def recovered_state(model: onnx.ModelProto, info: ModelInfo, path: Path) -> dict[str, torch.Tensor]:
    """The CharRNN state_dict (model/model.py) of the network an int8 file holds."""
    if info.precision != "int8" or not info.is_lstm:
        kind = f"{info.precision}, {info.model_config['model_type']}"
        raise UsageError(f"{path} is not an int8 LSTM file (it is {kind}); recover reads those only")
    if info.members != 1:
        raise UsageError(f"{path} is an ensemble of {info.members} networks; recover rebuilds one network")
    config = ModelConfig(**info.model_config)
    weights = _Weights(model, path)
    hidden = config.rnn_size
    table = np.concatenate([weights.get(f"table0{gate}") for gate in GATES], axis=1)
    embedding, input0, bias0 = split_table(table, config.wordvec_size)
    state = {"embedding.weight": embedding}
    for layer in range(config.num_layers):
        # int8_lstm stores [in, out] per gate: layer 0 its recurrent weights, later layers input over recurrent.
        gates = [weights.matrix(f"w{layer}{gate}") for gate in GATES]
        if layer == 0:
            state |= {"rnn.weight_ih_l0": input0, "rnn.weight_hh_l0": np.concatenate([g.T for g in gates])}
            bias = bias0
        else:
            state[f"rnn.weight_ih_l{layer}"] = np.concatenate([g[:hidden].T for g in gates])
            state[f"rnn.weight_hh_l{layer}"] = np.concatenate([g[hidden:].T for g in gates])
            bias = np.concatenate([weights.get(f"b{layer}{gate}") for gate in GATES])
        # Only the sum of the two biases is in the file.
        state[f"rnn.bias_ih_l{layer}"] = bias
        state[f"rnn.bias_hh_l{layer}"] = np.zeros_like(bias)
    state["decoder.weight"] = weights.matrix("wd").T
    state["decoder.bias"] = weights.get("bd")
    return {name: torch.from_numpy(np.array(array, np.float32)) for name, array in state.items()}


def recover_checkpoint(model_path: str | Path, output: str | Path, data: str | None = None) -> Checkpoint:
    """Write the checkpoint of an int8 file's network (see the module docstring) and return it."""
    path = check_input_file(model_path, "model")
    output = check_output_file(output, "output", [path])
    try:
        model = onnx.load(path)
    except Exception as exc:  # onnx raises protobuf's DecodeError and others for a damaged file
        raise UsageError(f"{path} is not a readable ONNX model: {type(exc).__name__}") from None
    try:
        info = parse_props({p.key: p.value for p in model.metadata_props})
    except MetadataError as exc:
        raise UsageError(f"{path} is not a speechbot model: {exc}") from None
    ckpt = Checkpoint(
        model_config=dict(info.model_config),
        model=recovered_state(model, info, path),
        vocab=list(info.vocab),
        unknown_policy=info.unknown_policy,
        cleaning=dict(info.cleaning),
        dataset_sha256=list(info.corpus_sha256),
    )
    if data is not None:
        dataset = load_dataset(data)
        if dataset.sha256 != ckpt.dataset_sha256 or dataset.vocab.chars != ckpt.vocab:
            raise UsageError(f"{data} was not prepared from the text {path} was trained on (sha256 or vocabulary)")
        ckpt.dataset = str(Path(data).resolve())
        torch.set_num_threads(1)  # the machine's other users keep their cores
        ckpt.val_bpc = nats_to_bits(evaluate_ids(ckpt.build_model(), dataset.splits["val"])[0])
    ckpt.save(output)
    return ckpt


def main(args: argparse.Namespace) -> None:
    ckpt = recover_checkpoint(args.model, args.output, args.data)
    print(
        f"wrote {args.output}: {ckpt.model_config['num_layers']}x{ckpt.model_config['rnn_size']} LSTM from {args.model}"
    )
    if ckpt.val_bpc is not None:
        print(f"val bits/char (one stream, PyTorch): {ckpt.val_bpc:.4f}")
