"""Dataset file layouts: the raw Flickr8K/Flickr30K release (token file and split
lists), Karpathy's ``dataset_*.json``, COCO's ``captions_*.json``, and users' own JSON
lines or CSV (splits drawn at random when the file gives none)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np

from fnemm.io.errors import FnemmError
from fnemm.io.files import text_lines, text_of

from fnemm.datasets.dataset import SPLITS, Dataset, _build, _norm_split


def _read_json(path: Path):
    try:
        return json.loads(text_of(path))
    except json.JSONDecodeError as e:
        raise FnemmError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix or re-download the file") from None


# --- Flickr raw release ---------------------------------------------------

_TOKEN_LINE = re.compile(r"^(?P<image>[^\t#]+)#(?P<n>\d+)\t(?P<caption>.*)$")


def read_token_file(path: Path) -> dict[str, list[str]]:
    """``{image: [captions]}`` from a Flickr ``*.token.txt`` file."""
    caps: dict[str, list[str]] = {}
    for lineno, line in enumerate(text_lines(path), 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        m = _TOKEN_LINE.match(line)
        if m is None or not m["caption"].strip():
            raise FnemmError(f"{path}:{lineno}: expected '<image>#<n><TAB><caption>', got "
                             f"{line[:60]!r}; fix or remove that line")
        caps.setdefault(m["image"], []).append(m["caption"].strip())
    return caps


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in text_lines(path) if line.strip()]


def load_flickr_raw(folder: Path, name: str | None = None, unlisted: bool = False) -> Dataset:
    """A Flickr release folder: ``*.token.txt`` (or ``*.token``) and the split
    lists ``*trainImages.txt``, ``*devImages.txt``, ``*testImages.txt``.
    Images listed in no split are left out, or with ``unlisted`` kept after the listed
    ones as split ``restval`` (like MSCOCO's: trained on only when asked); Flickr8K has
    91 such photos, and its token file one stray entry, ``2258277193_586949ec62.jpg.1``."""
    tokens = sorted(folder.glob("*.token.txt")) or sorted(folder.glob("*.token"))
    if not tokens:
        raise FnemmError(f"{folder}: no '*.token.txt' caption file here; point --dataset at the "
                         f"Flickr folder that holds Flickr8k.token.txt and the split lists")
    caps = read_token_file(tokens[0])
    split: dict[str, str] = {}
    order: list[str] = []
    for key, pattern in (("train", "*rain*mages.txt"), ("val", "*ev*mages.txt"), ("test", "*est*mages.txt")):
        files = sorted(folder.glob(pattern))
        if not files:
            raise FnemmError(f"{folder}: no split list matching {pattern!r} "
                             f"(e.g. Flickr_8k.trainImages.txt); put the official split files beside the token file")
        for image in _read_list(files[0]):
            if image in split:
                raise FnemmError(f"{files[0]}: image {image} is already in the {split[image]} split")
            if image not in caps:
                raise FnemmError(f"{files[0]}: image {image} has no caption in {tokens[0]}")
            split[image] = key
            order.append(image)
    if unlisted:
        rest = [image for image in caps if image not in split]
        split.update(dict.fromkeys(rest, "restval"))
        order += rest
    if name is None:
        name = "flickr30k" if "30k" in tokens[0].name.lower() else "flickr8k"
    return _build(name, order, caps, split, tokens[0])


# --- Karpathy json ---------------------------------------------------------

def load_karpathy(path: Path, data=None) -> Dataset:
    """Karpathy's split file; ``data`` is its parsed content if already read."""
    data = _read_json(path) if data is None else data
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise FnemmError(f"{path}: expected Karpathy's format {{'images': [...]}}; is this a dataset_*.json file?")
    order, caps, split = [], {}, {}
    for k, img in enumerate(data["images"]):
        where = f"{path}: images[{k}]"
        try:
            image = img["filename"]
            sentences = [s["raw"].strip() for s in img["sentences"]]
            split[image] = _norm_split(img["split"], where)
        except (KeyError, TypeError, AttributeError):
            raise FnemmError(f"{where}: needs 'filename', 'split' and 'sentences' with 'raw' text") from None
        if image in caps:
            raise FnemmError(f"{where}: image {image} appears twice")
        order.append(image)
        caps[image] = [s for s in sentences if s]
    return _build(data.get("dataset", path.stem.replace("dataset_", "")), order, caps, split, path)


# --- COCO captions json -------------------------------------------------------

def load_coco_captions(paths: list[tuple[Path, str | None]], data=None) -> Dataset:
    """COCO ``captions_*.json`` files, each with its split (inferred from the
    file name when not given, e.g. captions_val2014.json -> val). ``data`` is
    the parsed content of a single file if already read."""
    order, caps, split = [], {}, {}
    for path, given in paths:
        data = _read_json(path) if data is None or len(paths) > 1 else data
        if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
            raise FnemmError(f"{path}: expected COCO captions json with 'images' and 'annotations'")
        if given is None:
            m = re.search(r"(train|val|test)", path.name)
            if m is None:
                raise FnemmError(f"{path}: cannot tell the split from the name; "
                                 f"pass it as --dataset SPLIT={path}")
            given = m.group(1)
        sp = _norm_split(given, str(path))
        by_id = {}
        for k, img in enumerate(data["images"]):
            try:
                by_id[img["id"]] = img["file_name"]
            except (KeyError, TypeError):
                raise FnemmError(f"{path}: images[{k}] needs 'id' and 'file_name'") from None
        for k, ann in enumerate(data["annotations"]):
            try:
                image = by_id[ann["image_id"]]
                text = ann["caption"].strip()
            except KeyError:
                raise FnemmError(f"{path}: annotations[{k}] needs 'caption' and an 'image_id' "
                                 f"listed in 'images'") from None
            if image not in caps:
                caps[image] = []
                order.append(image)
                split[image] = sp
            if text:
                caps[image].append(text)
    dataset = _build("coco", order, caps, split, paths[0][0])
    if "test" not in dataset.splits:
        dataset.missing["test"] = ("COCO's captions files have no test split; the paper's 1K test images are "
                                   "Karpathy's: pass --dataset dataset_coco.json (his split file) instead")
    return dataset


# --- JSON lines ----------------------------------------------------------------

def load_jsonl(path: Path) -> Dataset:
    order, caps, split = [], {}, {}
    for lineno, line in enumerate(text_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FnemmError(f"{where}: invalid JSON ({e.msg}); each line must be one "
                             f'{{"image": ..., "captions": [...], "split": ...}} object') from None
        if (not isinstance(rec, dict) or not isinstance(rec.get("image"), str)
                or not isinstance(rec.get("captions"), list)
                or not all(isinstance(c, str) for c in rec["captions"])):
            raise FnemmError(f'{where}: expected {{"image": "name.jpg", "captions": ["...", ...], '
                             f'"split": "train|val|test" (optional)}}')
        image = rec["image"]
        if image in caps:
            raise FnemmError(f"{where}: image {image} appears twice")
        texts = [c.strip() for c in rec["captions"] if c.strip()]
        if not texts:
            raise FnemmError(f"{where}: image {image} has no non-empty caption")
        order.append(image)
        caps[image] = texts
        split[image] = _norm_split(rec["split"], where) if "split" in rec else None
    return _build(path.stem, order, caps, _fill_splits(split, path), path)


def _fill_splits(split: dict[str, str | None], path: Path) -> dict[str, str]:
    """Every image's split: as given, or, when none is given at all, drawn at random."""
    if not split:
        raise FnemmError(f"{path}: no images with captions in it; a dataset needs at least one "
                         f"(see `fnemm train --help` for the formats)")
    given = [i for i, s in split.items() if s is not None]
    if given and len(given) < len(split):
        missing = next(i for i, s in split.items() if s is None)
        raise FnemmError(f"{path}: image {missing} has no split while others have one; give every image "
                         f"a split, or none (then they are drawn at random)")
    if given:
        return split
    drawn = auto_splits(list(split))
    counts = {s: sum(1 for v in drawn.values() if v == s) for s in SPLITS}
    warnings.warn(f"{path.name}: no splits given; drew {counts['train']} train / {counts['val']} val / "
                  f"{counts['test']} test images at random (seed 0; give a split per image to choose)", stacklevel=2)
    return drawn


def auto_splits(images: list[str], seed: int = 0) -> dict[str, str]:
    """A random 80/10/10 split of ``images`` (at least one image in val and test once
    there are 3), the same for the same images and seed."""
    n = len(images)
    n_val = n_test = max(1 if n >= 3 else 0, round(0.1 * n))
    order = np.random.default_rng(seed).permutation(n)
    out = {}
    for rank, k in enumerate(order):
        out[images[k]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return out


# --- CSV ------------------------------------------------------------------------

def load_csv(path: Path) -> Dataset:
    """``image,caption[,split]`` rows with a header (several rows per image: its captions);
    without a split column, the splits are drawn at random."""
    import csv
    import io
    try:
        rows = list(csv.reader(io.StringIO(text_of(path), newline="")))
    except csv.Error as e:
        raise FnemmError(f"{path}: not a readable CSV ({e})") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "image" not in header or "caption" not in header:
        other = next((f" (separated by {sep!r}? save it with commas)" for sep in (";", "\t")
                      if len(header) == 1 and sep in header[0]), "")
        raise FnemmError(f"{path}:1: expected a header with image,caption[,split] columns, got "
                         f"{rows[0] if rows else []}{other}")
    col = {name: header.index(name) for name in ("image", "caption", "split") if name in header}
    order, caps, split = [], {}, {}
    for lineno, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise FnemmError(f"{path}:{lineno}: {len(row)} columns, the header has {len(header)}")
        image, caption = row[col["image"]].strip(), row[col["caption"]].strip()
        if not image or not caption:
            raise FnemmError(f"{path}:{lineno}: an empty image or caption")
        value = _norm_split(row[col["split"]], f"{path}:{lineno}") if "split" in col and row[col["split"]].strip() \
            else None
        if image not in caps:
            order.append(image)
            caps[image], split[image] = [], value
        elif split[image] != value:
            raise FnemmError(f"{path}:{lineno}: image {image} is in split {split[image]} on an earlier row")
        caps[image].append(caption)
    if not order:
        raise FnemmError(f"{path}: no rows under the header")
    return _build(path.stem, order, caps, _fill_splits(split, path), path)
