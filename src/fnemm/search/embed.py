"""Batch export: images or texts -> their joint embeddings through a trained model.

    embed_texts(checkpoint, texts, out)                 texts.npy + texts.json (+ texts.parquet)
    embed_images(checkpoint, source, out, features=)    images.npy + images.json (+ images.parquet)

The image ``source`` is a feature store (its images), a folder of image files, or a
list of image files. New images are extracted first, into ``out/features``, exactly as
the model's training store was made (``encode.extract_config_of``: the same CNN,
weights, crops, layers and post-processing, standardised with that store's training
statistics); that extraction is the long part and resumes like ``fnemm extract``.

Each ``.npy`` is float32, one L2-normalised row per item, in the order of the ids in
the ``.json`` beside it (which also says which model made them and how to compare
rows). Parquet files (``pip install 'fnemm[parquet]'``) hold the same rows as an
``embedding`` column next to ``id`` and ``path`` (images) or ``text`` (texts).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fnemm.io.version import __version__
from fnemm.joint.checkpoint import open_model
from fnemm.joint.inputs import embed_captions
from fnemm.joint.inputs import embed_images as embed_image_rows
from fnemm.io.errors import FnemmError
from fnemm.io.files import atomic_path, atomic_save_npy, atomic_write_json, sha256_file, text_lines
from fnemm.io.locks import folder_lock
from fnemm.io.progress import say

FORMAT = "fnemm-embeddings"
COMPARE = {"cosine": "rows are unit vectors: a text row scores an image row by their dot product",
           "order": "order embeddings: a text row t scores an image row v by -sum(max(0, t - v)^2)"}


@dataclass
class Embedded:
    """What :func:`embed_images` / :func:`embed_texts` wrote."""
    kind: str                      # "images" or "texts"
    vectors: np.ndarray            # (n, d) float32
    ids: list                      # image ids, or line numbers of the texts (from 0)
    files: list[Path]              # written, .npy first


def _meta(kind: str, opened, ids: list, extra: dict) -> dict:
    return {"format": FORMAT, "version": 1, "fnemm": __version__, "kind": kind, "count": len(ids),
            "dim": opened.config.model.embed_dim, "dtype": "float32", "similarity": opened.similarity_kind,
            "compare": COMPARE[opened.similarity_kind], "checkpoint": str(opened.path.resolve()),
            "checkpoint_sha256": sha256_file(opened.path), "ids": ids, **extra}


def _write(out: Path, kind: str, vectors: np.ndarray, meta: dict, columns: dict, parquet: bool) -> list[Path]:
    """``kind``.npy, ``kind``.json and (``parquet``) ``kind``.parquet, each written whole
    or not at all; the .json last, as the record that the .npy beside it is complete."""
    table = None
    if parquet:                    # before any file: a missing pyarrow leaves nothing half-done
        table = parquet_table(columns, vectors)
    files = [out / f"{kind}.npy"]
    atomic_save_npy(files[0], vectors.astype(np.float32))
    if table is not None:
        import pyarrow.parquet as pq
        files.append(out / f"{kind}.parquet")
        with atomic_path(files[-1]) as tmp:
            pq.write_table(table, tmp)
    else:
        (out / f"{kind}.parquet").unlink(missing_ok=True)    # a stale one would disagree with the .npy
    files.append(out / f"{kind}.json")
    atomic_write_json(files[-1], meta)
    return files


def _rows(rows: list[int], total: int) -> str:
    """'texts 3, 7 (2 of 40) have' for a warning about some of the texts (ids from 0)."""
    shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
    return f"text{'s' if len(rows) > 1 else ''} {shown} ({len(rows)} of {total}) ha{'ve' if len(rows) > 1 else 's'}"


def parquet_table(columns: dict, vectors: np.ndarray):
    """A pyarrow table of ``columns`` and an ``embedding`` column (fixed-size lists of float32)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise FnemmError("--parquet needs pyarrow: pip install 'fnemm[parquet]' (the .npy needs nothing)") from None
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1))
    embedding = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.table({**{k: pa.array(v) for k, v in columns.items()}, "embedding": embedding})


def embed_texts(checkpoint: str | Path, texts: list[str], out: str | Path, parquet: bool = False,
                device: str = "cpu") -> Embedded:
    """Embed sentences (one row each, in order) with ``checkpoint``'s text tower."""
    if not texts:
        raise FnemmError("no texts to embed")
    bad = [k for k, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise FnemmError(f"text {bad[0]} is empty; give one sentence per line")
    out = Path(out)
    opened = open_model(checkpoint, None, device)
    vocab = opened.vocab
    encoded = [vocab.encode_checked(t) for t in texts]           # each text tokenised once
    blind = [k for k, (ids, _) in enumerate(encoded)                # no word it knows among the tokens it reads
             if not any(i > 1 and any(ch.isalnum() for ch in vocab.itos[i]) for i in ids)]
    cut = [k for k, (_, was_cut) in enumerate(encoded) if was_cut]
    if blind:        # search refuses such a query (NoMatch); a batch says which rows they are
        warnings.warn(f"{_rows(blind, len(texts))} no word in the model's vocabulary (e.g. {texts[blind[0]]!r}): "
                      f"the model reads each as nothing, and its row ranks images at random (texts.json lists "
                      f"them as no_known_words)", stacklevel=2)
    if cut:
        warnings.warn(f"{_rows(cut, len(texts))} more than the model's {vocab.max_tokens} tokens: each was cut to "
                      f"its first {vocab.max_tokens} (texts.json lists them as cut)", stacklevel=2)
    vectors = embed_captions(opened.model, [ids for ids, _ in encoded], opened.device).cpu().numpy()
    ids = list(range(len(texts)))
    with folder_lock(out, "an embeddings folder"):
        files = _write(out, "texts", vectors, _meta("texts", opened, ids, {"texts": texts, "no_known_words": blind,
                                                                           "cut": cut}),
                       {"id": ids, "text": texts}, parquet)
    return Embedded("texts", vectors, ids, files)


def image_source(source: str | Path) -> tuple[str, Path, list[str] | None]:
    """("store" | "folder" | "list", folder, ids) of ``--images``: a feature store, a folder
    of image files, or a text file listing image files (one per line; relative ones are
    relative to the list's folder)."""
    source = Path(source)
    if source.is_dir():
        return ("store" if (source / "manifest.json").is_file() else "folder"), source, None
    if not source.is_file():
        raise FnemmError(f"{source}: no such folder or file; give a feature store, a folder of images, "
                         f"or a text file listing image files")
    first: dict[Path, int] = {}             # each file, at the line that lists it
    for n, line in enumerate((line.strip() for line in text_lines(source)), 1):
        path = (source.parent / line).resolve() if line else None
        if path in first:
            raise FnemmError(f"{source}:{n}: lists {line} again (first on line {first[path]}); drop the repeat")
        if path is not None:
            first[path] = n
    files = list(first)
    if not files:
        raise FnemmError(f"{source}: lists no image files; one path per line")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FnemmError(f"{source}: lists {len(missing)} missing file(s), e.g. {missing[0]}; fix or drop those lines")
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return "list", root, [str(f.relative_to(root)) for f in files]


def embed_images(checkpoint: str | Path, source: str | Path, out: str | Path, features: str | Path | None = None,
                 parquet: bool = False, device: str = "cpu", batch_size: int = 8, workers: int = 1,
                 quiet: bool = False) -> Embedded:
    """Embed images with ``checkpoint``'s image tower: the images of a feature store, or
    image files (a folder, or a list file) extracted first into ``out/features`` the way
    ``features`` (default: the store the checkpoint was trained on) was made."""
    out = Path(out)
    kind, folder, ids = image_source(source)
    open_model(checkpoint, None, device)          # a bad checkpoint fails before an extraction
    skipped: dict = {}
    with folder_lock(out, "an embeddings folder"):
        if kind == "store":
            store = folder
        else:
            store = out / "features"
            skipped = extract_like(checkpoint, source, store, features, device, batch_size, workers, quiet)
        opened = open_model(checkpoint, store, device)
        feats = opened.features
        vectors = embed_image_rows(opened.model, feats.array, opened.device).cpu().numpy()
        image_ids = list(feats.ids)
        base = folder if kind != "store" else _images_dir(store, feats)
        paths = [str((base / i).resolve()) if base is not None else None for i in image_ids]
        extra = {"paths": paths, "store": str(store.resolve()), "skipped": skipped}
        files = _write(out, "images", vectors, _meta("images", opened, image_ids, extra),
                       {"id": image_ids, "path": paths}, parquet)
    return Embedded("images", vectors, image_ids, files)


def _images_dir(store: Path, feats) -> Path | None:
    from fnemm.io.files import located
    m = feats.manifest or {}
    return located(store, m, "images_dir")


def extract_like(checkpoint: str | Path, source: str | Path, store: str | Path, features: str | Path | None = None,
                 device: str = "cpu", batch_size: int = 8, workers: int = 1, quiet: bool = False,
                 only: list[str] | None = None) -> dict[str, str]:
    """Extract image files (a folder, or a list file: ``image_source``; ``only``: these of
    its paths) into ``store`` the way ``features`` (default: the store ``checkpoint`` was
    trained on) was made: its CNN, weights, crops, recipe, and its training statistics.
    Resumes like ``fnemm extract``; returns {image: why} of the files that could not be
    read (and warns of them)."""
    from fnemm.features.encode import extract_config_of
    from fnemm.features.extraction import extract
    kind, folder, ids = image_source(source)
    if kind == "store":
        raise FnemmError(f"{source}: a feature store, not image files; pass it as --features")
    ids = only if only is not None else ids
    from fnemm.joint.checkpoint import trained_store
    reference = Path(features) if features else trained_store(checkpoint)
    config = extract_config_of(reference, device, batch_size=batch_size, workers=workers)
    result = extract(folder, store, config=config, stats_from=reference, quiet=quiet, ids=ids)
    skipped = {s["image"]: s["reason"] for s in result.manifest.get("skipped", [])}
    if skipped:                    # a warning, not progress: --quiet keeps it
        first = next(iter(skipped.items()))
        warnings.warn(f"{len(skipped)} image(s) could not be read and are left out (e.g. {first[0]}: {first[1]}); "
                      f"listed under skipped in {Path(store) / 'manifest.json'}", stacklevel=2)
    return skipped


def extract_missing(checkpoint: str | Path, features: str | Path, source: str | Path, store: str | Path,
                    device: str = "cpu", batch_size: int = 8, workers: int = 1, quiet: bool = False) -> Path | None:
    """The photos of ``source`` (a folder or a list file) that the store ``features`` does
    not hold, under their path or their file name, extracted into ``store`` the way
    ``features`` was made (its CNN, recipe and statistics): ``store``, or None when
    ``features`` holds every photo."""
    from fnemm.features.images import list_images
    kind, folder, ids = image_source(source)
    if kind == "store":
        raise FnemmError(f"{source}: a feature store, not image files; give the photos' folder or a list of them")
    held_features = open_model(checkpoint, features, device).features
    shown_from = _images_dir(Path(features), held_features)
    if shown_from is None or not folder.resolve().is_relative_to(shown_from.resolve()):
        raise FnemmError(f"{source}: the photos that join the gallery of {features} must be in its images folder "
                         f"({shown_from or 'unknown'}), where a search finds the photos it shows; copy them there, "
                         f"or index them alone (--images without --features)")
    held = set(held_features.ids)
    files = ids if ids is not None else list_images(folder)
    missing = [f for f in files if f not in held and Path(f).name not in held]
    if not missing:
        return None
    if not quiet:
        say(f"{source}: {len(missing)} of its {len(files)} photos are not in {features}; extracting them into "
            f"{store}")
    extract_like(checkpoint, source, store, features, device, batch_size, workers, quiet, only=missing)
    return Path(store)


def read_embeddings(folder: str | Path, kind: str = "images") -> tuple[np.ndarray, dict]:
    """(vectors, metadata) of a ``kind`` export in ``folder``, checked against each other."""
    from fnemm.io.files import read_json
    folder = Path(folder)
    meta = read_json(folder / f"{kind}.json", f"run `fnemm embed --{kind} ... --out {folder}` again")
    try:
        vectors = np.load(folder / f"{kind}.npy", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        raise FnemmError(f"{folder / f'{kind}.npy'}: missing or damaged; run `fnemm embed` again") from None
    if meta.get("format") != FORMAT or vectors.shape != (meta.get("count"), meta.get("dim")):
        raise FnemmError(f"{folder / f'{kind}.npy'}: does not match {kind}.json; run `fnemm embed` again")
    return vectors, meta
