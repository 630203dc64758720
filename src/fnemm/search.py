"""Search with a trained model: a sentence -> the best images of a gallery, an
image -> the captions that fit it best.

The gallery is a feature store (its images) and, for image queries, a dataset (its
captions). A query image that is not in the store goes through the same CNN,
crops and training statistics as the store (:class:`StoreEncoder`), so it lands in
the same feature space.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fnemm.cnn import TappedCNN, build_cnn
from fnemm.data import embed_captions, embed_images
from fnemm.datasets import Dataset
from fnemm.errors import FnemmError
from fnemm.extraction import forward_images, read_image, store_encoder
from fnemm.features import Features, load_features
from fnemm.fne import crops
from fnemm.fileio import sha256_file
from fnemm.losses import scores
from fnemm.train import check_same_producer, load_checkpoint, resolve_device


def select_gallery(features: Features, dataset: Dataset | None, split: str | None
                   ) -> tuple[list[str], list[tuple[str, str]]]:
    """(image ids, [(image id, caption)]) of a search gallery: the store's images, only
    those of ``split`` when given (which needs the dataset), and their captions."""
    ids = list(features.ids)
    if dataset is None and split not in (None, "all"):
        raise FnemmError(f"--split {split}: the splits come from a dataset; pass --dataset too")
    if dataset is not None and split not in (None, "all"):
        wanted = {dataset.image_ids[k] for k in dataset.split_indices(split, restval=False)}
        ids = [i for i in ids if i in wanted]
        if not ids:
            raise FnemmError(f"{features.source}: none of its images is in the {split} split of {dataset.name}")
    captions: list[tuple[str, str]] = []
    if dataset is not None:
        owners = set(ids)
        captions = [(image, c) for image, caps in zip(dataset.image_ids, dataset.captions)
                    if image in owners for c in caps]
    return ids, captions


class StoreEncoder:
    """Features of new images made exactly as a feature store's were.

    Thread-safe: the CNN's taps collect into one buffer, so forward passes take turns."""

    def __init__(self, store: str | Path, device: str = "cpu"):
        self.store = Path(store)
        self.encoder, self.manifest = store_encoder(self.store)
        m = self.manifest
        weights = m.get("weights")
        if weights not in (None, "random") and not Path(weights).is_file():
            raise FnemmError(f"{self.store}: its CNN weights {weights} are not here; embedding a new image "
                             f"needs the same weights file at that path")
        if weights not in (None, "random") and m.get("weights_sha256") and \
                sha256_file(weights) != m["weights_sha256"]:
            raise FnemmError(f"{weights}: changed since {self.store} was extracted (sha256 differs); "
                             f"re-extract the store or restore the file")
        self.cnn: TappedCNN = build_cnn(m["cnn"], weights if weights != "random" else "random").to(device)
        self.device, self.crops = device, int(m["crops"])
        self._lock = threading.Lock()

    def encode(self, path: str | Path) -> dict[str, np.ndarray]:
        """{'raw', 'fne', 'fc7'} rows (1, D) of one image file."""
        pixels, why, _ = read_image(Path(path) if Path(path).is_file() else None, self.crops)
        if why is not None:
            raise FnemmError(f"{path}: cannot use this image ({why}); give a JPEG/PNG photo")
        return self._encode_crops(pixels)

    def encode_image(self, image: Image.Image) -> dict[str, np.ndarray]:
        """As :meth:`encode`, for an image already decoded (e.g. an upload)."""
        return self._encode_crops(crops(image, self.crops))

    def _encode_crops(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            raw = forward_images(self.cnn, pixels, self.crops, self.device).astype(np.float16)
        return {"raw": raw, **self.encoder(raw)}


@dataclass
class Hit:
    rank: int
    score: float
    image: str
    caption: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class Searcher:
    """A trained model over a gallery: ``text(query, k)`` and ``image(path_or_id, k)``."""

    def __init__(self, checkpoint: str | Path, features: str | Path, dataset: Dataset | None = None,
                 split: str | None = None, device: str = "cpu"):
        self.device = resolve_device(device)
        self.model, self.vocab, self.config, _ = load_checkpoint(checkpoint, self.device)
        self.kind = self.config.features
        self.store = Path(features)
        self.features: Features = load_features(self.store, self.kind)
        check_same_producer(checkpoint, self.features)
        self.image_ids, self.captions = select_gallery(self.features, dataset, split)
        rows = self.features.rows_for(self.image_ids, "the gallery")
        self.images = embed_images(self.model, np.asarray(self.features.array[rows]), self.device)
        self._caption_emb = None
        self._encoder = None

    def _scores(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return scores(images, captions, self.config.model.similarity)

    def text(self, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` gallery images that fit ``query`` best."""
        if not query.strip():
            raise FnemmError("the text query is empty; give a sentence, e.g. \"a dog runs on the beach\"")
        cap = embed_captions(self.model, [self.vocab.encode(query)], self.device)
        return [Hit(r, v, self.image_ids[i]) for r, v, i in _top(self._scores(self.images, cap)[:, 0], k)]

    def image_embedding(self, image: str | Path) -> torch.Tensor:
        """A file goes through the store's CNN and statistics; an image id uses its stored row."""
        name = str(image)
        if Path(name).is_file():
            if self._encoder is None:
                self._encoder = StoreEncoder(self.store, self.device)
            return embed_images(self.model, self._encoder.encode(name)[self.kind], self.device)
        if name not in self.features.ids:
            raise FnemmError(f"{name}: no such image file, and not an image id of {self.store}")
        row = self.features.rows_for([name])
        return embed_images(self.model, np.asarray(self.features.array[row]), self.device)

    def image(self, image: str | Path, k: int = 5) -> list[Hit]:
        """The ``k`` gallery captions that fit ``image`` (a file, or an image id of the store) best."""
        if not self.captions:
            raise FnemmError("image queries rank captions: pass --dataset with the gallery's captions")
        if self._caption_emb is None:
            self._caption_emb = embed_captions(self.model, [self.vocab.encode(c) for _, c in self.captions],
                                               self.device)
        s = self._scores(self.image_embedding(image), self._caption_emb)[0]
        return [Hit(r, v, *self.captions[i]) for r, v, i in _top(s, k)]


def _top(scores: torch.Tensor, k: int) -> list[tuple[int, float, int]]:
    """(rank from 1, score, position) of the k best scores."""
    top = torch.topk(scores, min(k, len(scores)))
    return [(r + 1, float(v), int(i)) for r, (v, i) in enumerate(zip(top.values, top.indices))]


def format_hits(hits: list[Hit]) -> str:
    lines = []
    for h in hits:
        text = f"{h.rank:3d}  {h.score:+.4f}  {h.image}"
        lines.append(text + (f"  {h.caption}" if h.caption is not None else ""))
    return "\n".join(lines)
