"""Index folders (``fnemm index build``): a trained checkpoint's embeddings of a gallery,
its images (from a feature store) and, given a dataset, their captions::

    manifest.json     what it was built from (checkpoint and feature store: path and sha256;
                      the options) and, per side: count, method, search parameters, the
                      recall measured at build time; size and sha256 of every file below
    images.npy        (n, d) float32 image embeddings; images.ids.json their ids (a JSON list)
    captions.npy      (m, d) caption embeddings; captions.jsonl {"image", "caption"} per row
    *.faiss           the approximate indexes (exact sides are their embeddings)

Building writes everything but the manifest first, and the manifest last; an index
already built from the same inputs and options, whose files are intact, is kept.
:func:`read_index` loads a folder for :class:`fnemm.search.gallery.Gallery`, refusing it
when the checkpoint or store changed since, or when a file is missing or damaged.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fnemm.io.progress import bar, is_quiet, quieted, say

from fnemm.joint.checkpoint import checkpoint_file, open_model
from fnemm.joint.inputs import embed_captions, embed_images
from fnemm.io.errors import FnemmError
from fnemm.io.files import (atomic_path, atomic_write_json, atomic_write_text, cached_sha256, locate, located,
                            make_folder, read_json, relative_to, sha256_file, verifying)
from fnemm.io.faults import fault
from fnemm.search.vector_index import EXACT_UP_TO, METHODS, TUNE_QUERIES, VectorIndex, sample, tune_side
from fnemm.io.locks import folder_lock
from fnemm.datasets import Dataset
from fnemm.features.store import Features, load_features, stack_features

FORMAT = "fnemm-index"
VERSION = 3            # 3: exact sides search exhaustively (order too), ids as JSON, file hashes
BLOCK = 8192           # rows embedded at a time



def select_gallery(features: Features, dataset: Dataset | None, split: str | None
                   ) -> tuple[list[str], list[tuple[str, str]]]:
    """(image ids, [(image id, caption)]) of a search gallery: the store's images, only
    those of ``split`` when given (which needs the dataset), and their captions."""
    ids = list(features.ids)
    if dataset is None and split not in (None, "all"):
        raise FnemmError(f"--split {split}: the splits come from a dataset; pass --dataset too")
    if dataset is not None and split not in (None, "all"):
        wanted = {dataset.image_ids[k] for k in dataset.split_indices(split)}
        ids = [i for i in ids if i in wanted]
        if not ids:
            raise FnemmError(f"{features.source}: none of its images is in the {split} split of {dataset.name}")
    captions: list[tuple[str, str]] = []
    if dataset is not None:
        owners = set(ids)
        captions = [(image, c) for image, caps in zip(dataset.image_ids, dataset.captions)
                    if image in owners for c in caps]
        if not captions:
            raise FnemmError(f"{features.source}: none of its images is in {dataset.name}, so the gallery would "
                             f"have no captions; pass the dataset these features were extracted for (or no "
                             f"--dataset for photos alone)")
    return ids, captions


def store_file(features: Path) -> Path:
    """The file whose hash identifies a feature store: its manifest (written last, and
    rewritten whenever its arrays change), or a plain .npy matrix itself."""
    return features / "manifest.json" if features.is_dir() else features


def _rebuild(folder: Path) -> str:
    return f"rebuild it: fnemm index build --checkpoint CKPT --features STORE --out {folder}"


def _files_intact(folder: Path, files: dict, hashes: bool) -> str | None:
    """The first file that is missing or differs from the manifest's record, else None."""
    for name, record in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            return name
        if hashes and cached_sha256(path) != record["sha256"]:
            return name
    return None


def _verify_store(features: Path, store) -> None:
    """The array a store's rows are read from hashes as its manifest says."""
    entry = (store.manifest.get("arrays") or {}).get(store.kind)
    if entry:
        from fnemm.features.store import verify_array
        if (wrong := verify_array(features, entry, hashes=True)) is not None:
            raise FnemmError(f"{features / entry['file']}: damaged ({wrong}); re-run `fnemm extract` "
                             f"into {features} (the same command repairs it)")


def _request(opened, features: Path, store, dataset, split: str, ids, method: str, threshold: int,
             target_recall: float, tune_queries: list[str] | None) -> dict:
    """Everything the index depends on: the same request later means the same index. The
    store's manifest hash covers its arrays' sha256; the array read is checked against it."""
    _verify_store(features, store)
    return {
        "checkpoint": {"path": str(opened.path.resolve()), "sha256": sha256_file(opened.path)},
        "features": {"path": str(features.resolve()), "kind": store.kind,
                     "ids": str(Path(ids).resolve()) if ids else None,
                     "sha256": sha256_file(store_file(features))},
        "dataset": dataset.summary() if dataset is not None else None,
        "split": split, "method": method, "threshold": threshold, "target_recall": target_recall,
        "tune_queries": hashlib.sha256("\n".join(tune_queries).encode()).hexdigest() if tune_queries else None,
    }


def _relative_paths(out: Path, checkpoint: Path, features: Path, store) -> dict:
    """Where the checkpoint, store and images are from the index folder: they are found
    there first, so that moving them all together keeps the index usable."""
    images = located(features, store.manifest, "images_dir") if features.is_dir() else None
    return {"relative": {"checkpoint": relative_to(checkpoint, out), "features": relative_to(features, out)},
            **({"images_dir_relative": relative_to(images, out)} if images else {})}


def embed_gallery(opened, store, gallery: list[str], captions: list[tuple[str, str]],
                  images: np.ndarray | None = None, texts: np.ndarray | None = None):
    """(image embeddings, caption embeddings) of a gallery, ``BLOCK`` rows at a time: the
    store's rows are read a block at a time (never the whole gallery's features at once),
    into ``images`` / ``texts`` when given (e.g. files mapped into memory), else new arrays."""
    model, vocab, device, dim = opened.model, opened.vocab, opened.device, opened.config.model.embed_dim
    rows = store.rows_for(gallery, "the gallery")
    images = np.empty((len(gallery), dim), np.float32) if images is None else images
    texts = np.empty((len(captions), dim), np.float32) if texts is None else texts
    for s in bar(range(0, len(rows), BLOCK), desc="embed images", unit="block", quiet=len(rows) <= BLOCK):
        images[s:s + BLOCK] = embed_images(model, np.asarray(store.array[rows[s:s + BLOCK]]), device).cpu().numpy()
    for s in bar(range(0, len(captions), BLOCK), desc="embed captions", unit="block",
                 quiet=len(captions) <= BLOCK):
        tokens = [vocab.encode(c) for _, c in captions[s:s + BLOCK]]
        texts[s:s + BLOCK] = embed_captions(model, tokens, device).cpu().numpy()
    return images, texts


def _mapped(files: ExitStack, path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A float32 .npy of ``shape`` mapped into memory, replacing ``path`` once the stack
    closes without an error (the temporary file is removed otherwise)."""
    tmp = files.enter_context(atomic_path(path))
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
    files.callback(array.flush)      # closed in reverse: written out before the file replaces path
    return array


def _write_side(out: Path, side: str, items: np.ndarray, queries: np.ndarray, tuned_on: str,
                query_is_caption: bool, similarity: str, method: str, threshold: int, target: float) -> dict:
    """Build, tune and write one side (its embeddings, and its faiss index if approximate)."""
    say(f"index {side}: {len(items)} vectors ...")
    index = VectorIndex.build(items, method, threshold, progress=not is_quiet())
    if len(queries) == 0:                 # no captions: images query their own side
        queries = items
        tuned_on = "the images themselves (no captions: --tune-queries FILE is closer to text)"
    info = tune_side(index, queries[sample(len(queries), TUNE_QUERIES)], similarity, query_is_caption, target)
    info["tuned_on"] = tuned_on
    if index.method != "exact":
        index.save(out / f"{side}.faiss")
    else:
        (out / f"{side}.faiss").unlink(missing_ok=True)
    return info


def build_index(checkpoint: str | Path, features: str | Path, out: str | Path, *, dataset=None,
                split: str | None = None, ids: str | Path | None = None, method: str = "auto",
                threshold: int = EXACT_UP_TO, target_recall: float = 0.95, device: str = "cpu",
                quiet: bool = False, tune_queries: list[str] | None = None,
                extra: list[str | Path] | None = None) -> dict:
    """Embed a gallery with a trained checkpoint into an index folder ``out``; returns its
    manifest. An index already built from the same inputs and options, whose files are
    intact, is kept as is. ``extra``: stores of more images, made the way ``features``
    was (``embed.extract_missing``), that join the gallery; ``features`` stays the store
    whose CNN and statistics new photos go through at search time.

    The image side is tuned on sample caption queries: ``tune_queries`` (sentences,
    e.g. what users search for), else the dataset's captions, else (no captions) the
    images themselves."""
    if not 0 < target_recall <= 1:
        raise FnemmError(f"--target-recall {target_recall}: expected a fraction in (0, 1]")
    if method not in METHODS:
        raise FnemmError(f"--method {method}: expected one of {', '.join(METHODS)}")
    t0 = time.perf_counter()
    split, out, features = split or "all", Path(out), Path(features)
    from fnemm.io.locks import writer_of
    if (writer := writer_of(checkpoint_file(checkpoint).parent)) is not None:
        raise FnemmError(f"{checkpoint_file(checkpoint).parent}: still being trained ({writer}); its best.pt may "
                         f"change: index it once the training ends")
    opened = open_model(checkpoint, features, device, ids)
    more = [Path(e) for e in extra or []]
    with folder_lock(out, "an index"), quieted(quiet):
        return _build(opened, features, out, dataset, split, ids, method, threshold, target_recall, tune_queries, t0,
                      more)


def _extra_stores(opened, more: list[Path]) -> tuple[list, list[dict]]:
    """The extra stores' features, checked against the model like the gallery's store,
    and what the request records of them (their manifests' hashes cover their arrays)."""
    from fnemm.joint.checkpoint import check_features
    loaded = []
    for e in more:
        f = load_features(e, opened.config.features)
        check_features(opened.checkpoint, f, opened.path)
        _verify_store(e, f)
        loaded.append(f)
    return loaded, [{"path": str(e.resolve()), "sha256": sha256_file(store_file(e))} for e in more]


def _build(opened, features: Path, out: Path, dataset, split: str, ids, method: str, threshold: int,
           target_recall: float, tune_queries: list[str] | None, t0: float, more: list[Path]) -> dict:
    loaded, recorded = _extra_stores(opened, more)
    store = stack_features(opened.features, *loaded)
    gallery, captions = select_gallery(store, dataset, split)
    request = _request(opened, features, opened.features, dataset, split, ids, method, threshold, target_recall,
                       tune_queries)
    if recorded:
        request["features"]["extra"] = recorded
    old = out / "manifest.json"
    if old.exists():
        try:
            previous = read_json(old, "")
        except FnemmError:
            previous = {}
        if (previous.get("request"), previous.get("format"), previous.get("version")) == (request, FORMAT, VERSION) \
                and _files_intact(out, previous.get("files", {}), hashes=True) is None:
            say(f"{out}: index up to date (same checkpoint, features and options; files intact)")
            return previous

    make_folder(out)
    old.unlink(missing_ok=True)      # half-rewritten files must never sit under a valid manifest
    dim = opened.config.model.embed_dim
    with ExitStack() as files:       # embeddings go straight to their files, never whole in memory
        image_emb = _mapped(files, out / "images.npy", (len(gallery), dim))
        caption_emb = _mapped(files, out / "captions.npy", (len(captions), dim)) if captions else \
            np.empty((0, dim), np.float32)
        embed_gallery(opened, store, gallery, captions, image_emb, caption_emb)
        query_emb, image_queries = caption_emb, "the dataset's captions"
        if tune_queries:
            image_queries = "--tune-queries"
            picked = [tune_queries[k] for k in sample(len(tune_queries), TUNE_QUERIES)]
            query_emb = embed_captions(opened.model, [opened.vocab.encode(q) for q in picked],
                                       opened.device).cpu().numpy()
        common = {"similarity": opened.similarity_kind, "method": method, "threshold": threshold,
                  "target": target_recall}
        sides = {"images": _write_side(out, "images", image_emb, query_emb, image_queries, True, **common),
                 "captions": _write_side(out, "captions", caption_emb, image_emb, "the gallery's images", False,
                                         **common) if captions else None}
    fault("index-sides")
    atomic_write_json(out / "images.ids.json", gallery)
    if captions:
        atomic_write_text(out / "captions.jsonl",
                          "".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in captions))
    for name in ["images.ids.txt"] + ([] if captions else ["captions.npy", "captions.jsonl", "captions.faiss"]):
        (out / name).unlink(missing_ok=True)
    names = ["images.npy", "images.ids.json"] + (["captions.npy", "captions.jsonl"] if captions else [])
    names += [f"{s}.faiss" for s, info in sides.items() if info and info["method"] != "exact"]
    from fnemm.io.version import __version__
    manifest = {"format": FORMAT, "version": VERSION, "fnemm": __version__, "request": request,
                "similarity": opened.similarity_kind, "embed_dim": opened.config.model.embed_dim,
                "images_dir": store.manifest.get("images_dir"), **sides,
                **_relative_paths(out, opened.path, features, store),
                "files": {n: {"bytes": (out / n).stat().st_size, "sha256": sha256_file(out / n)} for n in names},
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


@dataclass
class IndexFolder:
    """A loaded index folder's parts, checked against each other and the manifest."""
    manifest: dict
    checkpoint: Path
    store: Path
    image_ids: list[str]
    images: VectorIndex
    captions: list[tuple[str, str]]
    caption_index: VectorIndex | None


def read_index(folder: str | Path, checkpoint: str | Path | None = None,
               features: str | Path | None = None) -> IndexFolder:
    """Load an index folder; the checkpoint and store are found where the build read them
    (or at ``checkpoint`` / ``features``) and must hash as they did then."""
    folder = Path(folder)
    rebuild = _rebuild(folder)
    m = read_json(folder / "manifest.json", rebuild) if (folder / "manifest.json").exists() else {}
    if m.get("format") != FORMAT:
        kind = ("a run folder: `index build --checkpoint` indexes its model" if (folder / "best.pt").exists() else
                "a feature store: `index build --features` indexes it" if m.get("format") == "fnemm-features" else
                f"format={m.get('format')!r}" if m else "no manifest.json")
        raise FnemmError(f"{folder}: not an index folder ({kind}); build one with `fnemm index build`")
    if m.get("version") != VERSION or not isinstance(m.get("files"), dict):
        raise FnemmError(f"{folder}: an index of an older fnemm (format version {m.get('version')}); {rebuild}")
    try:
        req, rel = m["request"], m.get("relative") or {}
        ckpt = checkpoint_file(checkpoint) if checkpoint else \
            locate(folder, rel.get("checkpoint"), req["checkpoint"]["path"]) or Path(req["checkpoint"]["path"])
        store = Path(features) if features else \
            locate(folder, rel.get("features"), req["features"]["path"]) or Path(req["features"]["path"])
        ckpt_sha, store_sha = req["checkpoint"]["sha256"], req["features"]["sha256"]
    except (KeyError, TypeError):
        raise FnemmError(f"{folder / 'manifest.json'}: incomplete (no request); {rebuild}") from None
    if not ckpt.exists():
        raise FnemmError(f"{folder}: its checkpoint {ckpt} is not there; pass --checkpoint, or {rebuild}")
    if verifying() and cached_sha256(ckpt) != ckpt_sha:
        raise FnemmError(f"{ckpt}: not the checkpoint {folder} was built from (sha256 differs); {rebuild}")
    if not store.exists() or not store_file(store).exists():
        raise FnemmError(f"{folder}: its feature store {store} is not there; pass --features, or {rebuild}")
    if verifying() and cached_sha256(store_file(store)) != store_sha:
        raise FnemmError(f"{store}: not the feature store {folder} was built from "
                         f"(its {store_file(store).name} sha256 differs); {rebuild}")
    # every file by size, and by content (sha256, remembered beside them while unchanged)
    small = {n: r for n, r in m["files"].items() if not n.endswith((".npy", ".faiss"))}
    bad = _files_intact(folder, m["files"], hashes=verifying()) or _files_intact(folder, small, hashes=True)
    if bad is not None:
        raise FnemmError(f"{folder / bad}: missing, or not the file the manifest records (its size or sha256 "
                         f"differs: an interrupted copy, damage, or a file from another index); {rebuild}")
    try:
        if not isinstance(m["images"], dict) or (m.get("captions") is not None and not isinstance(m["captions"], dict)):
            raise TypeError
        for side in [s for s in ("images", "captions") if m.get(s)]:
            int(m[side]["count"]), str(m[side]["method"])
    except (KeyError, TypeError, ValueError):
        raise FnemmError(f"{folder / 'manifest.json'}: incomplete or damaged (no image side); {rebuild}") from None
    image_ids = read_json(folder / "images.ids.json", rebuild, list)
    if not all(isinstance(i, str) for i in image_ids) or len(set(image_ids)) != len(image_ids):
        raise FnemmError(f"{folder / 'images.ids.json'}: not a list of distinct image ids; {rebuild}")
    images = _side(folder, m, "images", len(image_ids), "images.ids.json")
    captions: list[tuple[str, str]] = []
    caption_index = None
    if m.get("captions"):
        captions = _read_captions(folder / "captions.jsonl", rebuild)
        caption_index = _side(folder, m, "captions", len(captions), "captions.jsonl")
    return IndexFolder(m, ckpt, store, image_ids, images, captions, caption_index)


def _read_captions(path: Path, rebuild: str) -> list[tuple[str, str]]:
    out = []
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise FnemmError(f"{path}: not UTF-8 text; {rebuild}") from None
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            out.append((str(rec["image"]), str(rec["caption"])))
        except (ValueError, KeyError, TypeError):
            raise FnemmError(f"{path}:{n}: not an {{\"image\", \"caption\"}} line; {rebuild}") from None
    return out


def _side(folder: Path, manifest: dict, side: str, count: int, listed_in: str) -> VectorIndex:
    info = manifest[side]
    rebuild = _rebuild(folder)
    # memory-mapped: an approximate index keeps its own copy, and the order re-rank
    # reads only its candidates' rows
    try:
        vectors = np.load(folder / f"{side}.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise FnemmError(f"{folder / (side + '.npy')}: cannot read it ({str(e)[:120]}); {rebuild}") from None
    if vectors.ndim != 2 or len(vectors) != info["count"] or len(vectors) != count:
        raise FnemmError(f"{folder / (side + '.npy')}: {len(vectors)} rows, the manifest says {info['count']} "
                         f"and {listed_in} lists {count}; {rebuild}")
    for s in range(0, len(vectors), 65536):     # embeddings are unit vectors: damage shows in their norms
        norms = np.linalg.norm(np.asarray(vectors[s:s + 65536], np.float64), axis=1)
        if len(norms) and not np.all(np.abs(norms - 1) < 1e-3):
            raise FnemmError(f"{folder / (side + '.npy')}: damaged (rows that are not unit vectors); {rebuild}")
    if info["method"] == "exact":           # searched block by block from the mapped file
        return VectorIndex.build(vectors, "exact")
    index = VectorIndex.load(folder / f"{side}.faiss", vectors, info["method"])
    index.set_params(**info.get("params", {}))
    return index
