"""Search with a trained model: one :class:`Gallery` for the CLI, the service and Python.

A gallery is a trained model over images (and, with a dataset, their captions):
a sentence -> the images that fit it, an image -> the captions that fit it or the
images like it. Two ways to open one, one way to search:

    Gallery.from_store(checkpoint, features, dataset, split)   exact, in memory
    Gallery.from_index(folder)                                 an index folder (faiss; millions)

Every query is checked here (empty or overlong text, k out of range, unknown image
ids, images that cannot be read, a gallery without captions) and refused with a
``FnemmError`` whose ``status`` the service answers with; nothing above repeats it.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from fnemm.joint.checkpoint import OpenModel, open_model
from fnemm.joint.inputs import embed_captions, embed_images
from fnemm.datasets import Dataset
from fnemm.features.fne import as_seen
from fnemm.features.images import files_by_name
from fnemm.io.errors import Conflict, FnemmError, NoMatch, NotFound
from fnemm.io.files import located, read_json
from fnemm.io.progress import quieted
from fnemm.search.index_folder import embed_gallery, select_gallery
from fnemm.search.vector_index import VectorIndex

MAX_K = 100                    # results per query, everywhere
MAX_QUERY_CHARS = 1000
THUMB_SIZES = (64, 1024)       # allowed thumbnail sizes (longest side)


@dataclass
class Hit:
    """One result: text -> image hits carry the image's ``captions``; image -> caption
    hits their ``caption`` (and the image it describes)."""
    rank: int
    score: float
    image: str
    caption: str | None = None
    captions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {"rank": self.rank, "score": self.score, "image": self.image}
        if self.caption is not None:
            out["caption"] = self.caption
        else:
            out["captions"] = self.captions
        return out


class Gallery:
    """A trained model over a gallery. Safe to query from several threads: searches only
    read, and the CNN (new images) runs under a lock."""

    def __init__(self, opened: OpenModel, image_ids: list[str], images: VectorIndex,
                 captions: list[tuple[str, str]], caption_index: VectorIndex | None, store: Path | None,
                 images_dir: Path | None, candidates: dict[str, int] | None = None, manifest: dict | None = None,
                 encoder: bool = True, name: str = "the gallery"):
        self.opened, self.model, self.vocab, self.config = opened, opened.model, opened.vocab, opened.config
        self.device, self.similarity = opened.device, opened.similarity_kind
        self.image_ids, self.images = image_ids, images
        self.captions, self.caption_index = captions, caption_index
        self.captions_of: dict[str, list[str]] = {}
        for image, caption in captions:
            self.captions_of.setdefault(image, []).append(caption)
        self._row = {image: k for k, image in enumerate(image_ids)}
        self.store, self.images_dir, self.name = store, images_dir, name
        self.candidates = candidates or {}
        self.manifest = manifest or {}
        self._encoder, self._want_encoder = None, encoder and store is not None and store.is_dir()
        self._lock = threading.Lock()
        self._paths: dict[str, Path] | None = None
        self._left_out: dict[str, str] | None = None
        self.thumbnail = lru_cache(maxsize=1024)(self._thumbnail)

    # --- opening ------------------------------------------------------------------
    @classmethod
    def from_store(cls, checkpoint: str | Path, features: str | Path, dataset: Dataset | None = None,
                   split: str | None = None, device: str = "cpu", ids: str | Path | None = None,
                   encoder: bool = True) -> "Gallery":
        """Exact search over a feature store's images (of ``split``), embedded now and held in
        memory (an index folder, ``fnemm index build``, maps them from disk instead)."""
        opened = open_model(checkpoint, features, device, ids)
        store = opened.features
        image_ids, captions = select_gallery(store, dataset, split)
        with quieted():             # a search's set-up, not a job: no progress lines
            images, texts = embed_gallery(opened, store, image_ids, captions)   # the store read block by block
        caption_index = VectorIndex.build(texts, "exact") if captions else None
        images_dir = located(features, store.manifest, "images_dir") if Path(features).is_dir() else None
        return cls(opened, image_ids, VectorIndex.build(images, "exact"), captions, caption_index,
                   Path(features), images_dir, encoder=encoder, name=str(features))

    @classmethod
    def from_index(cls, folder: str | Path, checkpoint: str | Path | None = None,
                   features: str | Path | None = None, device: str = "cpu", encoder: bool = True) -> "Gallery":
        """An index folder of ``fnemm index build``, loaded once."""
        from fnemm.search.index_folder import read_index
        f = read_index(folder, checkpoint, features)
        opened = open_model(f.checkpoint, None, device)
        m = f.manifest
        candidates = {s: (m.get(s) or {}).get("candidates", 100) for s in ("images", "captions")}
        images_dir = located(folder, m, "images_dir")
        return cls(opened, f.image_ids, f.images, f.captions, f.caption_index, f.store, images_dir, candidates, m,
                   encoder, str(folder))

    # --- queries --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._row

    def _check_k(self, k: int) -> int:
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise FnemmError(f"k={k}: must be between 1 and {MAX_K}")
        return k

    def _search(self, index: VectorIndex, query: np.ndarray, k: int, query_is_caption: bool, side: str,
                similarity: str | None = None):
        scores, rows = index.search(query, k, similarity or self.similarity, query_is_caption,
                                    self.candidates.get(side, 100))
        return [(r + 1, float(s), int(i)) for r, (s, i) in enumerate(zip(scores[0], rows[0])) if i >= 0]

    def text_embedding(self, query: str) -> np.ndarray:
        """(1, d) of a sentence; refuses empty, overlong or invalid text."""
        if not isinstance(query, str) or not query.strip():
            raise FnemmError("the text query is empty; give a sentence, e.g. \"a dog runs on the beach\"")
        if len(query) > MAX_QUERY_CHARS:
            raise FnemmError(f"the text query is {len(query)} characters; at most {MAX_QUERY_CHARS}")
        try:
            query.encode("utf-8")
        except UnicodeEncodeError:
            raise FnemmError("the text query is not valid Unicode text (a lone surrogate?)") from None
        if not self.known_words(query):
            unknown = self.unknown_words(query)
            raise NoMatch(f"none of the query's words is in the model's vocabulary"
                          f"{' (' + ', '.join(unknown[:10]) + ')' if unknown else ''}: the model would read it as "
                          f"nothing and rank the images at random; use words like those of its training captions",
                          unknown_words=unknown)
        return embed_captions(self.model, [self.vocab.encode(query)], self.device).cpu().numpy()

    def unknown_words(self, query: str) -> list[str]:
        from fnemm.joint.text import tokenize
        return [w for w in tokenize(query) if w not in self.vocab.stoi]

    def known_words(self, query: str) -> list[str]:
        """The query's words the model has embeddings for (punctuation aside)."""
        from fnemm.joint.text import tokenize
        return [w for w in tokenize(query) if w in self.vocab.stoi and any(ch.isalnum() for ch in w)]

    def text(self, query: str, k: int = 10) -> list[Hit]:
        """The ``k`` gallery images that fit the sentence best, with their captions."""
        self._check_k(k)
        emb = self.text_embedding(query)
        return [Hit(r, s, self.image_ids[i], captions=self.captions_of.get(self.image_ids[i], []))
                for r, s, i in self._search(self.images, emb, k, True, "images")]

    def rank_of(self, query: str, image_id: str) -> int:
        """Where ``image_id`` ranks among all the gallery's images for ``query`` (from 1)."""
        if image_id not in self._row:
            raise NotFound(f"{image_id}: no such image in {self.name}")
        _, rows = self.images.exhaustive(self.text_embedding(query), len(self), self.similarity)
        return int(np.flatnonzero(rows[0] == self._row[image_id])[0]) + 1

    @property
    def encoder(self):
        """The store's CNN and statistics for new images (loaded on first use), or None."""
        if self._encoder is None and self._want_encoder:
            with self._lock:
                if self._encoder is None:
                    from fnemm.features.encode import StoreEncoder
                    self._encoder = StoreEncoder(self.store, self.device)
        return self._encoder

    def image_embedding(self, image, files: bool = True) -> np.ndarray:
        """(1, d) of an image id of the gallery, a PIL image, bytes of an image file, or
        (unless ``files`` is False: a string from a client is only ever an id) a file."""
        from fnemm.features.encode import decode_upload
        if isinstance(image, str) and image in self._row:
            return np.array(self.images.vectors[self._row[image]], np.float32)[None]       # a copy: writable
        if isinstance(image, (bytes, bytearray)):
            image = decode_upload(bytes(image))
        elif not isinstance(image, Image.Image) and (not files or not Path(image).is_file()):
            if (why := self.left_out().get(str(image))) is not None:
                raise NotFound(f"{image}: left out of {'this gallery' if not files else self.name} when its "
                               f"features were extracted ({why}); replace the file and build it again")
            raise NotFound(f"{image}: no such image in this gallery" if not files else
                           f"{image}: a folder; give one image file" if Path(image).is_dir() else
                           f"{image}: no such image file, and not an image id of {self.name}")
        if self.encoder is None:
            raise Conflict("new images need the feature store of `fnemm extract` (its CNN and statistics); "
                           "this gallery was built from a plain feature matrix")
        feats = self.encoder.encode_image(image) if isinstance(image, Image.Image) else self.encoder.encode(image)
        return embed_images(self.model, feats[self.config.features], self.device).cpu().numpy()

    def left_out(self) -> dict[str, str]:
        """{image id: why} of the images the gallery's store skipped when it was extracted
        (unreadable files, say; its manifest's "skipped"), read once."""
        if self._left_out is None:
            manifest = self.store / "manifest.json" if self.store is not None else None
            skipped = (read_json(manifest, "extract the store again").get("skipped")
                       if manifest is not None and manifest.is_file() else None)
            self._left_out = {str(s["image"]): str(s.get("reason", "skipped")) for s in skipped or []
                              if isinstance(s, dict) and "image" in s}
        return self._left_out

    def image(self, image, k: int = 10, files: bool = True) -> list[Hit]:
        """The ``k`` gallery captions that fit ``image`` (see :meth:`image_embedding`) best."""
        self._check_k(k)
        if self.caption_index is None:
            raise Conflict("this gallery has no captions to rank; build it with a dataset "
                           "(`fnemm index build --dataset ...`, or --dataset for `fnemm search`)")
        emb = self.image_embedding(image, files)
        return [Hit(r, s, self.captions[i][0], caption=self.captions[i][1])
                for r, s, i in self._search(self.caption_index, emb, k, False, "captions")]

    def similar(self, image, k: int = 10, files: bool = True) -> list[Hit]:
        """The ``k`` gallery images most like ``image`` (cosine of the image embeddings)."""
        self._check_k(k)
        emb = self.image_embedding(image, files)
        return [Hit(r, s, self.image_ids[i], captions=self.captions_of.get(self.image_ids[i], []))
                for r, s, i in self._search(self.images, emb, k, True, "images", "cosine")]

    # --- the images themselves ----------------------------------------------------------
    def image_path(self, image_id: str) -> Path | None:
        """The file of a gallery image, under the store's images folder (searched
        recursively once when not directly there, as COCO's train2014/val2014; None where
        several files there have its name: either could be the photo)."""
        if image_id not in self._row or self.images_dir is None:
            return None
        direct = self.images_dir / image_id
        if direct.is_file():
            return direct
        with self._lock:
            if self._paths is None:
                self._paths = {name: paths[0] for name, paths in files_by_name(self.images_dir).items()
                               if len(paths) == 1}
        return self._paths.get(Path(image_id).name)

    def _thumbnail(self, image_id: str, size: int) -> bytes:
        """A JPEG of a gallery image, ``size`` pixels on its longest side (cached)."""
        if not THUMB_SIZES[0] <= size <= THUMB_SIZES[1]:
            raise FnemmError(f"size={size}: must be between {THUMB_SIZES[0]} and {THUMB_SIZES[1]}")
        if image_id not in self._row:
            raise NotFound(f"{image_id}: no such image in this gallery")
        path = self.image_path(image_id)
        if path is None:
            raise NotFound(f"{image_id}: in the gallery, but its file is not in the images folder (or is not the "
                           f"only file there of that name)")
        try:
            with Image.open(path) as img:
                img = as_seen(img)
                img.thumbnail((size, size))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=85)
        except OSError as e:
            raise NotFound(f"{image_id}: its file cannot be read ({type(e).__name__})") from None
        return buf.getvalue()

    def info(self) -> dict:
        return {"images": len(self.image_ids), "captions": len(self.captions), "similarity": self.similarity,
                "embed_dim": self.config.model.embed_dim, "features": self.config.features,
                "method": {"images": self.images.method,
                           **({"captions": self.caption_index.method} if self.caption_index else {})},
                "image_upload": self._want_encoder}


def Searcher(checkpoint, features, dataset=None, split=None, device="cpu") -> Gallery:  # noqa: N802
    """The former search class, kept as a name: :meth:`Gallery.from_store`."""
    return Gallery.from_store(checkpoint, features, dataset, split, device)


def format_hits(hits: list[Hit], paths: dict[str, Path | None] | None = None) -> str:
    """A table a person can judge: rank, score, image, its caption (text -> image: the
    first of its captions and how many more), and where the image file is."""
    lines = []
    for h in hits:
        text = f"{h.rank:3d}  {h.score:+.4f}  {h.image}"
        if h.caption is not None:
            text += f'  "{h.caption}"'
        elif h.captions:
            text += f'  "{h.captions[0]}"' + (f" (+{len(h.captions) - 1})" if len(h.captions) > 1 else "")
        lines.append(text)
        if paths and paths.get(h.image):
            lines.append(f"{'':19}{paths[h.image]}")
    return "\n".join(lines)
