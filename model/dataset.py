"""A prepared dataset on disk: meta.json, one .npy array of token ids and one .txt per split. Torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.cli import UsageError
from model.text import CleaningOptions, Vocab

DATASET_FORMAT = "speechbot-dataset/1"
SPLITS = ("train", "val", "test")


class DatasetError(UsageError):
    """A dataset folder that is missing, incomplete or not ours."""


@dataclass
class Dataset:
    vocab: Vocab
    cleaning: CleaningOptions
    meta: dict
    splits: dict[str, np.ndarray]

    @property
    def sha256(self) -> list[str]:
        return [source["sha256"] for source in self.meta.get("sources", [])]


def split_sizes(total: int, val_frac: float, test_frac: float) -> dict[str, int]:
    """Split lengths in file order, as torch-rnn does: train first, then val, then test."""
    val = int(total * val_frac)
    test = int(total * test_frac)
    return {"train": total - val - test, "val": val, "test": test}


def write_dataset(out_dir: Path, ids: np.ndarray, vocab: Vocab, meta: dict, sizes: dict[str, int]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if len(vocab) <= 256 else np.uint16
    start = 0
    for name in SPLITS:
        split = ids[start : start + sizes[name]]
        np.save(out_dir / f"{name}.npy", split.astype(dtype))
        # The cleaned text too, for the commands that take --text (export's check, export evaluate).
        (out_dir / f"{name}.txt").write_text(vocab.decode(split.tolist()), encoding="utf-8")
        start += sizes[name]
    full_meta = {"format": DATASET_FORMAT, **vocab.to_meta(), **meta, "split_sizes": sizes}
    (out_dir / "meta.json").write_text(json.dumps(full_meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_dataset(data_dir: str | Path) -> Dataset:
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise DatasetError(
            f"{data_dir} is not a prepared dataset (no meta.json); make one with "
            "`python -m model prepare --input FILE --out DIR`"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{meta_path} is not valid JSON: {exc}") from exc
    if meta.get("format") != DATASET_FORMAT:
        raise DatasetError(f"{meta_path} has format {meta.get('format')!r}, expected {DATASET_FORMAT!r}")
    vocab = Vocab.from_meta(meta)
    splits = {}
    for name in SPLITS:
        path = data_dir / f"{name}.npy"
        if not path.is_file():
            raise DatasetError(f"{data_dir} has no {name}.npy; prepare the dataset again")
        splits[name] = load_split(path, meta.get("split_sizes", {}).get(name), len(vocab))
    return Dataset(vocab, CleaningOptions.from_dict(meta.get("cleaning", {})), meta, splits)


def load_split(path: Path, expected_length: int | None, vocab_size: int) -> np.ndarray:
    """One split's token ids, checked against meta.json: a file cut short by a full disk or an interrupted
    copy must stop the command with one line, not a numpy traceback or a model trained on part of it."""
    remedy = "prepare the dataset again with `python -m model prepare`"
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:  # numpy's errors for a cut or overwritten file
        raise DatasetError(f"{path} is damaged (numpy cannot read it: {exc}); {remedy}") from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise DatasetError(f"{path} holds {ids.dtype} of shape {ids.shape}, not one row of token ids; {remedy}")
    if expected_length is not None and len(ids) != expected_length:
        raise DatasetError(
            f"{path} holds {len(ids):,} token ids where meta.json says {expected_length:,}; it is damaged or "
            f"from another preparation; {remedy}"
        )
    if len(ids) and int(ids.max()) >= vocab_size:
        raise DatasetError(f"{path} holds token id {int(ids.max())}, beyond the vocabulary of {vocab_size}; {remedy}")
    return ids
