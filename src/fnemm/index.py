"""Retrieval indexes over a gallery's joint-space embeddings (faiss).

``VectorIndex`` holds one side (images, or captions): exact inner product
(``IndexFlatIP``) up to ``threshold`` vectors, approximate above it (HNSW by
default, or IVF). Order-embedding models score with S_OE(c, i) = -||max(0, c - i)||^2,
which faiss cannot search: candidates come from the inner product (both sides are
unit vectors) and are re-ranked exactly by the order score.

An index folder (``build_index``, ``fnemm index build``) is a trained checkpoint's
embeddings of a gallery: its images (from a feature store) and, given a dataset,
their captions::

    manifest.json    checkpoint + feature store (paths and sha256), per side: count,
                     method, search parameters and the recall measured at build time
    images.npy       (n, d) float32 image embeddings; images.ids.txt their ids
    captions.npy     (m, d) caption embeddings; captions.jsonl {"image", "caption"}
    *.faiss          the approximate indexes (exact ones are rebuilt at load: instant)

Approximate search parameters (HNSW efSearch, IVF nprobe, order re-rank
candidates) are tuned at build time: the smallest whose recall@10 against
exhaustive search reaches ``target_recall`` with 95% confidence (a lower bound
over sample queries: captions for the image side, images for the caption side).
``Gallery`` loads a folder, refuses it when the checkpoint or store changed
since, and answers text and image queries.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fnemm.errors import FnemmError
from fnemm.fileio import atomic_path, atomic_save_npy, atomic_write_json, atomic_write_text, sha256_file

METHODS = ("auto", "exact", "hnsw", "ivf")
EXACT_UP_TO = 100_000          # 'auto': exact inner product up to this many vectors


def _faiss():
    try:
        import faiss
    except ImportError:
        raise FnemmError("retrieval indexes need faiss; pip install 'fnemm[serve]' (faiss-cpu)") from None
    return faiss


def order_scores_np(queries: np.ndarray, items: np.ndarray, query_is_caption: bool) -> np.ndarray:
    """S_OE between each query and each of its items: queries (q, d), items (q, c, d) -> (q, c)."""
    if query_is_caption:
        diff = np.maximum(queries[:, None, :] - items, 0)
    else:
        diff = np.maximum(items - queries[:, None, :], 0)
    return -(diff * diff).sum(-1)


@dataclass
class VectorIndex:
    vectors: np.ndarray            # (n, d) float32, unit rows
    method: str                    # exact | hnsw | ivf
    index: object = None

    @classmethod
    def build(cls, vectors: np.ndarray, method: str = "auto", threshold: int = EXACT_UP_TO,
              seed: int = 0, progress: bool = False) -> "VectorIndex":
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = vectors.shape
        if method not in METHODS:
            raise FnemmError(f"--method {method}: expected one of {', '.join(METHODS)}")
        if method == "auto":
            method = "exact" if n <= threshold else "hnsw"
        if method == "exact":
            index = faiss.IndexFlatIP(d)
        elif method == "hnsw":
            index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            index.hnsw.efSearch = 128
        else:
            nlist = max(1, min(int(np.sqrt(n)), n // 39))     # faiss wants >= 39 points per list
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            train = vectors[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
            index.train(train)
            index.nprobe = max(1, nlist // 3)    # measured: recall@10 0.73 at nlist/8, 0.97 at ~nlist/3
        block = 50_000                # added in blocks for the progress bar (as good as one add)
        for s in tqdm(range(0, n, block), desc=f"{method} index", unit="block",
                      disable=not progress or n <= block):
            index.add(vectors[s:s + block])
        return cls(vectors, method, index)

    @property
    def params(self) -> dict[str, int]:
        """The search-time knob of an approximate index."""
        if self.method == "hnsw":
            return {"ef_search": int(self.index.hnsw.efSearch)}
        if self.method == "ivf":
            return {"nprobe": int(self.index.nprobe), "nlist": int(self.index.nlist)}
        return {}

    def set_params(self, ef_search: int | None = None, nprobe: int | None = None, **_) -> None:
        if ef_search is not None and self.method == "hnsw":
            self.index.hnsw.efSearch = int(ef_search)
        if nprobe is not None and self.method == "ivf":
            self.index.nprobe = int(nprobe)

    def __len__(self) -> int:
        return len(self.vectors)

    def search_ip(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self)))
        return scores, rows

    def tune(self, queries: np.ndarray, exact_rows: np.ndarray, target: float, k: int = 10) -> float:
        """Smallest efSearch / nprobe whose recall@k vs ``exact_rows`` reaches ``target``
        on queries like these, not only on these (``recall_bound``), or the largest
        tried when none does; returns the mean recall it reached on ``queries``."""
        if self.method == "hnsw":
            key, ladder = "ef_search", [16, 32, 64, 128, 256, 512, 1024]
        elif self.method == "ivf":
            nlist = int(self.index.nlist)
            key, ladder = "nprobe", sorted({min(nlist, 2 ** e) for e in range(0, 20) if 2 ** (e - 1) < nlist})
        else:
            return 1.0
        hits = np.zeros(1)
        for value in ladder:
            self.set_params(**{key: value})
            hits = recall_per_query(self.search_ip(queries, k)[1], exact_rows, k)
            if recall_bound(hits) >= target:
                break
        return float(hits.mean())

    def search(self, queries: np.ndarray, k: int, similarity: str = "cosine",
               query_is_caption: bool = True, candidates: int = 100) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, rows) per query under ``similarity``; order: re-ranked candidates."""
        if similarity == "cosine":
            return self.search_ip(queries, k)
        _, rows = self.search_ip(queries, max(k, candidates))
        safe = np.where(rows < 0, 0, rows)
        exact = order_scores_np(np.asarray(queries, np.float32), self.vectors[safe], query_is_caption)
        exact = np.where(rows < 0, -np.inf, exact)
        top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, top, 1), np.take_along_axis(rows, top, 1)

    def exhaustive(self, queries: np.ndarray, k: int, similarity: str, query_is_caption: bool = True):
        """The exact top-k by brute force (the reference recall is measured against), in
        blocks of queries: a (block, n) score matrix at a time, 400 MB at 1M vectors."""
        from fnemm.losses import order_scores
        v = torch.from_numpy(np.asarray(self.vectors, np.float32))
        values, rows = [], []
        for s in range(0, len(queries), 100):
            q = torch.from_numpy(np.asarray(queries[s:s + 100], np.float32))
            if similarity == "cosine":
                scores = q @ v.t()
            else:
                scores = order_scores(v, q).t() if query_is_caption else order_scores(q, v)
            top = torch.topk(scores, min(k, len(self)), dim=1)
            values.append(top.values.numpy())
            rows.append(top.indices.numpy())
        if not values:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate(values), np.concatenate(rows)

    def save(self, path: Path) -> None:
        """faiss writes a temporary file that replaces ``path`` (no in-memory copy of a
        multi-GB index)."""
        with atomic_path(path) as tmp:
            _faiss().write_index(self.index, str(tmp))

    @classmethod
    def load(cls, path: Path, vectors: np.ndarray, method: str) -> "VectorIndex":
        try:
            index = _faiss().read_index(str(path))
        except (OSError, RuntimeError) as e:
            raise FnemmError(f"{path}: not a readable faiss index ({str(e).splitlines()[0][:120]}); "
                             f"rebuild it with `fnemm index build`") from None
        if index.ntotal != len(vectors):
            raise FnemmError(f"{path}: holds {index.ntotal} vectors but its embeddings file has "
                             f"{len(vectors)}; rebuild it with `fnemm index build`")
        return cls(np.ascontiguousarray(vectors, np.float32), method, index)


def recall_per_query(approx: np.ndarray, exact: np.ndarray, k: int = 10) -> np.ndarray:
    """Per query, the fraction of the exact top-k rows that the approximate top-k found."""
    return np.array([len(set(a[:k]) & set(e[:k])) / min(k, len(e)) for a, e in zip(approx, exact)])


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-k rows that the approximate top-k found."""
    hits = recall_per_query(approx, exact, k)
    return float(hits.mean()) if len(hits) else 1.0


def recall_bound(hits: np.ndarray) -> float:
    """One-sided 95% lower confidence bound of the mean recall over queries like the
    ones measured (normal approximation): tuning to the mean alone lands half the
    time below the target on new queries (seen: 0.962 on the tuning sample, 0.950
    on held-out queries, 1M HNSW)."""
    if len(hits) < 2:
        return float(hits.mean()) if len(hits) else 1.0
    return float(hits.mean() - 1.645 * hits.std(ddof=1) / np.sqrt(len(hits)))


# --- index folders: a checkpoint's embeddings of a gallery -------------------------

INDEX_FORMAT = "fnemm-index"
INDEX_VERSION = 2                  # 2: tuned to a 95% lower bound of recall (1: to the sample mean)
TUNE_K = 10                        # recall@10 is what the build reports and tunes for
TUNE_QUERIES = 500                 # sample queries per side (100 for order models: exhaustive S_OE is slow)
CANDIDATE_LADDER = (50, 100, 200, 500, 1000, 2000, 5000)


def _store_file(features: Path) -> Path:
    """The file whose hash identifies a feature store: its manifest (written last, and
    rewritten whenever its arrays change), or a plain .npy matrix itself."""
    return features / "manifest.json" if features.is_dir() else features


def _checkpoint_file(checkpoint: Path) -> Path:
    return checkpoint / "best.pt" if checkpoint.is_dir() else checkpoint


def _sample(n: int, size: int, seed: int = 0) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _tune_side(index: VectorIndex, queries: np.ndarray, similarity: str, query_is_caption: bool,
               target: float) -> dict:
    """Tune ``index`` on ``queries`` and measure what it keeps vs exhaustive search."""
    out: dict = {"method": index.method, "count": len(index)}
    if len(queries) == 0 or len(index) == 0:
        return {**out, "params": index.params, "recall_at_10": None, "queries": 0}
    k = min(TUNE_K, len(index))
    if similarity == "order":
        queries = queries[:TUNE_QUERIES // 5]
    _, exact_ip = index.exhaustive(queries, k, "cosine")
    out["recall_at_10"] = round(index.tune(queries, exact_ip, target, k), 4)   # the cosine index itself
    if similarity == "order":
        _, exact = index.exhaustive(queries, k, "order", query_is_caption)
        for candidates in CANDIDATE_LADDER:
            candidates = min(candidates, len(index))
            _, rows = index.search(queries, k, "order", query_is_caption, candidates)
            hits = recall_per_query(rows, exact, k)
            if recall_bound(hits) >= target or candidates == len(index):
                break
        out["candidates"] = candidates
        out["rerank_recall_at_10"] = round(float(hits.mean()), 4)
    out["params"] = index.params
    out["queries"] = len(queries)
    return out


def build_index(checkpoint: str | Path, features: str | Path, out: str | Path, dataset=None,
                split: str | None = None, ids: str | Path | None = None, method: str = "auto",
                threshold: int = EXACT_UP_TO, target_recall: float = 0.95, device: str = "cpu",
                quiet: bool = False, tune_queries: list[str] | None = None) -> dict:
    """Embed a gallery with a trained checkpoint into an index folder ``out``; returns its
    manifest. An index already built from the same inputs and options is kept as is.

    The image side is tuned on sample caption queries: ``tune_queries`` (sentences,
    e.g. what users search for), else the dataset's captions, else (no captions) the
    images themselves."""
    from fnemm.data import embed_captions, embed_images
    from fnemm.features import load_features
    from fnemm.search import select_gallery
    from fnemm.train import check_same_producer, load_checkpoint, resolve_device

    if not 0 < target_recall <= 1:
        raise FnemmError(f"--target-recall {target_recall}: expected a fraction in (0, 1]")
    if method not in METHODS:
        raise FnemmError(f"--method {method}: expected one of {', '.join(METHODS)}")
    t0 = time.perf_counter()
    split = split or "all"
    out, checkpoint, features = Path(out), Path(checkpoint), Path(features)
    device = resolve_device(device)
    model, vocab, config, _ = load_checkpoint(checkpoint, device)
    store = load_features(features, config.features, ids)
    check_same_producer(checkpoint, store)
    gallery, captions = select_gallery(store, dataset, split)

    request = {
        "checkpoint": {"path": str(_checkpoint_file(checkpoint).resolve()),
                       "sha256": sha256_file(_checkpoint_file(checkpoint))},
        "features": {"path": str(features.resolve()), "kind": store.kind,
                     "ids": str(Path(ids).resolve()) if ids else None,
                     "sha256": sha256_file(_store_file(features))},
        "dataset": dataset.summary() if dataset is not None else None,
        "split": split, "method": method, "threshold": threshold, "target_recall": target_recall,
        "tune_queries": hashlib.sha256("\n".join(tune_queries).encode()).hexdigest() if tune_queries else None,
    }
    old = out / "manifest.json"
    if old.exists():
        try:
            previous = json.loads(old.read_text())
        except ValueError:
            previous = {}
        if (previous.get("request"), previous.get("format"), previous.get("version")) == \
                (request, INDEX_FORMAT, INDEX_VERSION):
            if not quiet:
                print(f"{out}: index up to date (same checkpoint, features and options)")
            return previous

    rows = store.rows_for(gallery, "the gallery")
    image_emb = np.empty((len(gallery), config.model.embed_dim), np.float32)
    block = 8192
    for s in tqdm(range(0, len(rows), block), desc="embed images", unit="block", disable=quiet or len(rows) <= block):
        image_emb[s:s + block] = embed_images(model, np.asarray(store.array[rows[s:s + block]]), device).cpu().numpy()
    caption_emb = np.empty((len(captions), config.model.embed_dim), np.float32)
    for s in tqdm(range(0, len(captions), block), desc="embed captions", unit="block",
                  disable=quiet or len(captions) <= block):
        tokens = [vocab.encode(c) for _, c in captions[s:s + block]]
        caption_emb[s:s + block] = embed_captions(model, tokens, device).cpu().numpy()

    query_emb, image_queries = caption_emb, "the dataset's captions"
    if tune_queries:
        image_queries = "--tune-queries"
        picked = [tune_queries[k] for k in _sample(len(tune_queries), TUNE_QUERIES)]
        query_emb = embed_captions(model, [vocab.encode(q) for q in picked], device).cpu().numpy()
    similarity = config.model.similarity
    sides = {}
    out.mkdir(parents=True, exist_ok=True)
    old.unlink(missing_ok=True)      # half-rewritten files must never sit under a valid manifest
    for side, items, queries, tuned_on, query_is_caption in (
            ("images", image_emb, query_emb, image_queries, True),
            ("captions", caption_emb, image_emb, "the gallery's images", False)):
        if side == "captions" and not captions:
            sides[side] = None
            continue
        if not quiet:
            print(f"index {side}: {len(items)} vectors ...", flush=True)
        index = VectorIndex.build(items, method, threshold, progress=not quiet)
        if len(queries) == 0:                 # no captions: images query their own side
            queries = items
            tuned_on = "the images themselves (no captions: --tune-queries FILE is closer to text)"
        info = _tune_side(index, queries[_sample(len(queries), TUNE_QUERIES)], similarity,
                          query_is_caption, target_recall)
        info["tuned_on"] = tuned_on
        atomic_save_npy(out / f"{side}.npy", items)
        if index.method != "exact":
            index.save(out / f"{side}.faiss")
        else:
            (out / f"{side}.faiss").unlink(missing_ok=True)
        sides[side] = info
    atomic_write_text(out / "images.ids.txt", "".join(f"{i}\n" for i in gallery))
    if captions:
        atomic_write_text(out / "captions.jsonl",
                          "".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in captions))
    else:
        for name in ("captions.npy", "captions.jsonl", "captions.faiss"):
            (out / name).unlink(missing_ok=True)
    from fnemm import __version__
    manifest = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "fnemm": __version__, "request": request,
                "similarity": similarity, "embed_dim": config.model.embed_dim,
                "images_dir": store.manifest.get("images_dir"),
                "images": sides["images"], "captions": sides["captions"],
                "build_seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def describe_index(manifest: dict) -> str:
    """What a build made, in a few lines."""
    lines = []
    for side in ("images", "captions"):
        info = manifest.get(side)
        if not info:
            lines.append(f"{side}: none (pass --dataset to index the gallery's captions)")
            continue
        text = f"{side}: {info['count']} vectors, {info['method']}"
        if info.get("params"):
            text += " (" + ", ".join(f"{k} {v}" for k, v in info["params"].items()) + ")"
        if info["method"] != "exact" and info.get("recall_at_10") is not None:
            text += (f", recall@10 vs exact {info['recall_at_10']:.3f} on {info['queries']} queries "
                     f"from {info.get('tuned_on', 'a sample')}")
        if "rerank_recall_at_10" in info:
            text += (f", order re-rank of {info['candidates']} cosine candidates: recall@10 vs "
                     f"exhaustive S_OE {info['rerank_recall_at_10']:.3f}")
        lines.append(text)
    return "\n".join(lines)


def _read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.exists():
        raise FnemmError(f"{folder}: no manifest.json; not an index folder (build one with `fnemm index build`)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise FnemmError(f"{path}: invalid JSON ({e}); rebuild the index with `fnemm index build`") from None
    if manifest.get("format") != INDEX_FORMAT:
        raise FnemmError(f"{path}: not an fnemm index (format={manifest.get('format')!r})")
    return manifest


class Gallery:
    """A built index folder, loaded once: text -> images and image -> captions.

    The checkpoint and feature store are found where the build read them (or at
    ``checkpoint`` / ``features``) and must hash as they did then. Safe to query
    from several threads: searches only read, and the CNN (image uploads) runs
    under a lock.
    """

    def __init__(self, folder: str | Path, checkpoint: str | Path | None = None,
                 features: str | Path | None = None, device: str = "cpu", encoder: bool = True):
        from fnemm.train import load_checkpoint
        self.folder = Path(folder)
        m = self.manifest = _read_manifest(self.folder)
        req = m["request"]
        ckpt = _checkpoint_file(Path(checkpoint)) if checkpoint else Path(req["checkpoint"]["path"])
        store = Path(features) if features else Path(req["features"]["path"])
        rebuild = f"rebuild it: fnemm index build --checkpoint CKPT --features STORE --out {self.folder}"
        if not ckpt.exists():
            raise FnemmError(f"{self.folder}: its checkpoint {ckpt} is not there; pass --checkpoint, or {rebuild}")
        if sha256_file(ckpt) != req["checkpoint"]["sha256"]:
            raise FnemmError(f"{ckpt}: not the checkpoint {self.folder} was built from (sha256 differs); {rebuild}")
        if not store.exists():
            raise FnemmError(f"{self.folder}: its feature store {store} is not there; pass --features, or {rebuild}")
        if sha256_file(_store_file(store)) != req["features"]["sha256"]:
            raise FnemmError(f"{store}: not the feature store {self.folder} was built from "
                             f"(its {_store_file(store).name} sha256 differs); {rebuild}")
        needed = ["images.npy", "images.ids.txt"] + (["captions.npy", "captions.jsonl"] if m.get("captions") else [])
        needed += [f"{side}.faiss" for side in ("images", "captions") if (m.get(side) or {}).get("method", "exact") != "exact"]
        missing = [name for name in needed if not (self.folder / name).is_file()]
        if missing:
            raise FnemmError(f"{self.folder}: {missing[0]} is missing (an interrupted copy?); {rebuild}")
        self.device = device
        self.model, self.vocab, self.config, _ = load_checkpoint(ckpt, device)
        self.similarity = m["similarity"]
        self.image_ids = [line for line in (self.folder / "images.ids.txt").read_text().splitlines() if line]
        self._row = {image: k for k, image in enumerate(self.image_ids)}
        self.images = self._side("images")
        if len(self.image_ids) != len(self.images):
            raise FnemmError(f"{self.folder}: images.ids.txt lists {len(self.image_ids)} ids for "
                             f"{len(self.images)} embeddings; {rebuild}")
        self.captions: list[tuple[str, str]] = []
        self.captions_of: dict[str, list[str]] = {}
        self.caption_index = None
        if m.get("captions"):
            for line in (self.folder / "captions.jsonl").read_text().splitlines():
                rec = json.loads(line)
                self.captions.append((rec["image"], rec["caption"]))
                self.captions_of.setdefault(rec["image"], []).append(rec["caption"])
            self.caption_index = self._side("captions")
        self.store = store
        self.images_dir = Path(m["images_dir"]) if m.get("images_dir") else None
        self._paths: dict[str, Path] | None = None
        self._paths_lock = threading.Lock()
        self.encoder = None
        if encoder and store.is_dir():
            from fnemm.search import StoreEncoder
            self.encoder = StoreEncoder(store, device)

    def _side(self, side: str) -> VectorIndex:
        info = self.manifest[side]
        # memory-mapped: an approximate index keeps its own copy, and the order re-rank
        # reads only its candidates' rows
        try:
            vectors = np.load(self.folder / f"{side}.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise FnemmError(f"{self.folder / (side + '.npy')}: cannot read it ({str(e)[:120]}); "
                             f"rebuild the index with `fnemm index build`") from None
        if len(vectors) != info["count"]:
            raise FnemmError(f"{self.folder / (side + '.npy')}: {len(vectors)} rows, the manifest says "
                             f"{info['count']}; rebuild the index")
        if info["method"] == "exact":
            index = VectorIndex.build(vectors, "exact")
        else:
            index = VectorIndex.load(self.folder / f"{side}.faiss", vectors, info["method"])
            index.set_params(**info.get("params", {}))
        return index

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._row

    def _search(self, index: VectorIndex, query: np.ndarray, k: int, query_is_caption: bool, side: str):
        info = self.manifest[side]
        scores, rows = index.search(query, k, self.similarity, query_is_caption, info.get("candidates", 100))
        return [(r + 1, float(s), int(i)) for r, (s, i) in enumerate(zip(scores[0], rows[0])) if i >= 0]

    def unknown_words(self, query: str) -> list[str]:
        from fnemm.text import tokenize
        return [w for w in tokenize(query) if w not in self.vocab.stoi]

    def text(self, query: str, k: int = 10) -> list[dict]:
        """The ``k`` gallery images that fit the sentence best: rank, score, image, captions."""
        from fnemm.data import embed_captions
        if not query.strip():
            raise FnemmError("the text query is empty; give a sentence, e.g. \"a dog runs on the beach\"")
        emb = embed_captions(self.model, [self.vocab.encode(query)], self.device).cpu().numpy()
        return [{"rank": r, "score": s, "image": self.image_ids[i], "captions": self.captions_of.get(self.image_ids[i], [])}
                for r, s, i in self._search(self.images, emb, k, True, "images")]

    def image_embedding(self, image) -> np.ndarray:
        """(1, d) of an image id of the gallery, a PIL image or an image file."""
        from PIL import Image

        from fnemm.data import embed_images
        if isinstance(image, str) and image in self._row:
            return self.images.vectors[self._row[image]][None]
        if not isinstance(image, Image.Image) and not Path(image).is_file():
            raise FnemmError(f"{image}: no such image file, and not an image id of {self.folder}")
        if self.encoder is None:
            raise FnemmError(f"{self.store}: new images need the feature store of `fnemm extract` "
                             f"(its CNN and statistics); this index was built from a plain matrix")
        if isinstance(image, Image.Image):
            feats = self.encoder.encode_image(image)
        else:
            feats = self.encoder.encode(image)
        return embed_images(self.model, feats[self.config.features], self.device).cpu().numpy()

    def image(self, image, k: int = 10) -> list[dict]:
        """The ``k`` gallery captions that fit ``image`` best: rank, score, caption, image."""
        if self.caption_index is None:
            raise FnemmError(f"{self.folder}: this index has no captions; rebuild it with --dataset")
        return [{"rank": r, "score": s, "image": self.captions[i][0], "caption": self.captions[i][1]}
                for r, s, i in self._search(self.caption_index, self.image_embedding(image), k, False, "captions")]

    def image_path(self, image_id: str) -> Path | None:
        """The file of a gallery image, under the store's images folder (searched
        recursively once when not directly there, as COCO's train2014/val2014)."""
        if image_id not in self._row or self.images_dir is None:
            return None
        direct = self.images_dir / image_id
        if direct.is_file():
            return direct
        with self._paths_lock:
            if self._paths is None:
                self._paths = {p.name: p for p in self.images_dir.rglob("*") if p.is_file()}
        return self._paths.get(Path(image_id).name)

    def info(self) -> dict:
        m = self.manifest
        return {"images": len(self.image_ids), "captions": len(self.captions), "similarity": self.similarity,
                "embed_dim": m["embed_dim"], "features": self.config.features,
                "method": {s: m[s]["method"] for s in ("images", "captions") if m.get(s)},
                "image_upload": self.encoder is not None}
