"""A tiny corpus and a tiny LSTM trained briefly on it with plain torch, saved as a real checkpoint: what the
tests export and serve instead of the bundled model."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from model.__main__ import main as model_main
from model.checkpoint import Checkpoint
from model.model import CharRNN, ModelConfig
from model.text import CleaningOptions, Vocab, clean_text

TINY_CORPUS = (
    "SPEECH 1\nThank you very much. We are going to make America great again! (APPLAUSE)\n"
    "We will win so much, you'll get tired of winning. Believe me, folks. Who pays for the wall? Mexico.\n"
    "Our jobs are leaving; our trade deals are terrible. It’s true. We're going to bring them back.\n"
) * 8


def prepare_tiny(root: Path, batch_size: int) -> Path:
    """TINY_CORPUS prepared by `python -m model prepare` (checked for `batch_size` streams) into root/ds."""
    corpus, out = root / "corpus.txt", root / "ds"
    corpus.write_text(TINY_CORPUS, encoding="utf-8")
    model_main(["prepare", "--input", str(corpus), "--out", str(out), "--batch-size", str(batch_size)])
    return out


def train_tiny(
    path: Path,
    text: str = TINY_CORPUS,
    model_type: str = "lstm",
    iterations: int = 80,
    seed: int = 0,
    rnn_size: int = 16,
) -> Path:
    """A 2x16 network trained for a few iterations with plain torch, saved as a real checkpoint."""
    cleaning = CleaningOptions()
    cleaned = clean_text(text, cleaning)
    vocab = Vocab.from_text(cleaned)
    ids = torch.tensor(vocab.encode(cleaned))
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=len(vocab), model_type=model_type, rnn_size=rnn_size, num_layers=2, wordvec_size=8)
    net = CharRNN(config)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    seq = 32
    for _ in range(iterations):
        starts = torch.randint(0, len(ids) - seq - 1, (8,))
        x = torch.stack([ids[s : s + seq] for s in starts])
        y = torch.stack([ids[s + 1 : s + seq + 1] for s in starts])
        logits, _ = net(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    Checkpoint(
        model_config=config.to_dict(),
        model=net.state_dict(),
        vocab=vocab.chars,
        unknown_policy=vocab.unknown_policy,
        cleaning=cleaning.to_dict(),
        dataset_sha256=[hashlib.sha256(text.encode("utf-8")).hexdigest()],  # as if prepared from the text's file
        val_bpc=loss.item() / math.log(2),
        iteration=iterations,
    ).save(path)
    return path
