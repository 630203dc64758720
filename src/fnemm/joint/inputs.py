"""Joins a Dataset, its image features and a vocabulary into model-ready splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import warnings

from fnemm.datasets import Dataset
from fnemm.io.errors import FnemmError
from fnemm.io.files import scratch_array
from fnemm.features.store import Features
from fnemm.joint.text import Vocab, pad_batch


@dataclass
class SplitData:
    """The images of one split: a feature row and encoded captions per image."""
    image_ids: list[str]
    features: np.ndarray            # (n_images, D): rows read when used (Rows) or in memory
    captions: list[list[list[int]]]  # captions[k]: token-id lists of image k

    def __len__(self) -> int:
        return len(self.image_ids)

    def head(self, n: int) -> "SplitData":
        """The first ``n`` images (e.g. MSCOCO's 1K validation images)."""
        return SplitData(self.image_ids[:n], self.features[:n], self.captions[:n])

    def eval_captions(self, per_image: int) -> tuple[list[list[int]], torch.Tensor]:
        """The first ``per_image`` captions of every image, flattened, and the
        image index of each (the standard 5-captions protocol)."""
        flat, owner = [], []
        for k, caps in enumerate(self.captions):
            for c in caps[:per_image]:
                flat.append(c)
                owner.append(k)
        return flat, torch.tensor(owner, dtype=torch.long)


def build_vocab(dataset: Dataset) -> Vocab:
    """Every word of the train and validation captions (Sec. 4.3.2)."""
    keep = set(dataset.split_indices("train")) | set(dataset.split_indices("val"))
    return Vocab.build(c for k in sorted(keep) for c in dataset.captions[k])


GATHER_BYTES = 32 << 20        # rows read at once from a (memory-mapped) store


def gather_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` read straight into its own block: the store's rows in sorted order
    (friendlier to a memory-mapped file), a chunk at a time, so that beyond the block the
    memory is one chunk (fancy indexing would build a second, whole copy first)."""
    rows = np.asarray(rows, dtype=np.int64)
    block = np.empty((len(rows), array.shape[1]), dtype=array.dtype)
    order = np.argsort(rows, kind="stable")
    step = max(1, GATHER_BYTES // max(1, array.shape[1] * array.dtype.itemsize))
    for s in range(0, len(rows), step):
        part = order[s:s + step]
        block[part] = array[rows[part]]
    return block


class Rows:
    """Some rows of a memory-mapped store, in a given order, read only when indexed: a
    split's features without a copy of them in memory (MSCOCO's training rows are 1.9 GB
    as int8 codes, 7.7 GB as float32). Indexing (an index array or a slice) returns the
    rows as an array; the kernel keeps the file's pages cached, and a store replaced on
    disk (atomically) leaves this mapping on the old file."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.array.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __getitem__(self, key) -> np.ndarray:
        return gather_rows(self.array, self.rows[key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        block = gather_rows(self.array, self.rows)
        return block if dtype is None else block.astype(dtype)


def split_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray | Rows:
    """A split's feature rows: read when used (``Rows``) from a memory-mapped store, or
    gathered into one block from an array already in memory."""
    if isinstance(array, np.memmap) or isinstance(getattr(array, "base", None), np.memmap):
        return Rows(array, rows)
    return gather_rows(array, rows)


def split_data(dataset: Dataset, features: Features, vocab: Vocab, split: str) -> SplitData:
    indices = dataset.split_indices(split)
    if not indices:
        raise FnemmError(dataset.missing.get(split) or f"dataset {dataset.name!r} has no {split!r} images; "
                                                        f"check the split lists / 'split' fields of --dataset")
    ids = [dataset.image_ids[k] for k in indices]
    block = split_rows(features.array, features.rows_for(ids, f"the {split} split"))
    caps, cut = [], []
    for k in indices:
        encoded = [vocab.encode_checked(c) for c in dataset.captions[k]]
        caps.append([ids for ids, _ in encoded])
        cut += [(dataset.image_ids[k], n + 1) for n, (_, was_cut) in enumerate(encoded) if was_cut]
    if cut:
        image, n = cut[0]
        warnings.warn(f"{dataset.name} ({split}): {len(cut)} caption(s) longer than {vocab.max_tokens} "
                      f"tokens cut to {vocab.max_tokens}, e.g. caption {n} of {image} "
                      f"(--set max_caption_tokens=N to change)", stacklevel=2)
    return SplitData(ids, block, caps)


def _output(rows: int, model, device: str, mapped: bool) -> torch.Tensor:
    """Where embeddings go: on ``device``, or (CPU only) a scratch file's mapped pages."""
    if mapped and rows and torch.device(device).type == "cpu":
        try:
            return torch.from_numpy(scratch_array((rows, model.config.embed_dim)))
        except OSError:                  # no writable temporary folder: in memory, as on a GPU
            pass
    return torch.empty(rows, model.config.embed_dim, device=device)


@torch.no_grad()
def embed_images(model, features: np.ndarray, device: str, batch: int = 1024, mapped: bool = False) -> torch.Tensor:
    """Embeds image features a batch at a time; ``mapped`` keeps them in a scratch file's
    pages (``io.files.scratch_array``) when the device is the CPU."""
    model.eval()
    out = _output(len(features), model, device, mapped)
    for s in range(0, len(features), batch):
        # torch.tensor copies: rows of a read-only memory-mapped store cannot be shared
        out[s:s + batch] = model.image(torch.tensor(np.asarray(features[s:s + batch])).to(device))
    return out


@torch.no_grad()
def embed_captions(model, captions: list[list[int]], device: str, batch: int = 1024,
                   mapped: bool = False) -> torch.Tensor:
    """Embeds captions in length-sorted batches (less padding), returned in input order;
    ``mapped`` as for :func:`embed_images`."""
    model.eval()
    order = sorted(range(len(captions)), key=lambda k: len(captions[k]))
    out = _output(len(captions), model, device, mapped)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        tokens, lengths = pad_batch([captions[k] for k in idx])
        out[torch.tensor(idx, device=device)] = model.text(tokens.to(device), lengths)
    return out
