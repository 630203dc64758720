"""Image-caption datasets: one ``Dataset`` type, many file layouts.

Loaders (``load_dataset`` picks one from the path):
- the raw Flickr8K/Flickr30K release: a folder with the token file
  (``<image>#<n><TAB><caption>`` lines) and the split lists;
- Karpathy's ``dataset_{flickr8k,flickr30k,coco}.json`` (COCO's "restval" images
  are not trained on unless asked, ``Dataset.with_restval``: the paper used the
  82,783 train2014 images; VSE++ and later work add the 30,504 restval);
- COCO's ``captions_{train,val}2014.json``, one file per split (they hold no test
  split: the paper's test images are Karpathy's, from dataset_coco.json);
- a JSON-lines file ``{"image": ..., "captions": [...], "split": ...}`` per line
  for users' own data;
- ``flickr8k-1k`` (or ``flickr8k-1k=FOLDER``): the real benchmark bundled in
  ../shared/data/flickr8k: the images present in its ``images/`` folder with their
  official captions and splits (753 train / 113 val / 125 test; images in no list
  are left out). Read in place, never copied.
- ``flickr8k-224`` (or ``flickr8k-224=FOLDER``): the paper's own benchmark, all of
  Flickr8K (6,000 / 1,000 / 1,000 images, 5 captions each), photos from the bundled
  ``images-224/`` (224x224, squashed); every image of the lists must be there.

Image ids are file names (e.g. ``1000268201_693b08cb0e.jpg``): the same ids a
feature store carries.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fnemm.errors import FnemmError

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "dev": "val", "valid": "val",
                  "validation": "val", "test": "test", "restval": "restval"}


@dataclass
class Dataset:
    name: str
    image_ids: list[str]
    captions: list[list[str]]   # captions[k] describe image_ids[k]
    splits: list[str]           # 'train' | 'val' | 'test' | 'restval', per image
    # what to do about a split the files do not have: {split: one line of advice}
    missing: dict[str, str] = field(default_factory=dict, repr=False)
    # where the photos are, when the dataset knows (the bundled benchmarks): the default --images
    images: Path | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not (len(self.image_ids) == len(self.captions) == len(self.splits)):
            raise ValueError("image_ids, captions and splits must have one entry per image")

    def __repr__(self) -> str:           # not every caption, in a notebook
        return f"Dataset({self.summary()})"

    def split_indices(self, split: str) -> list[int]:
        """Positions of the images of ``split`` (MSCOCO's restval images are their own
        split: not 'train' unless :meth:`with_restval` made them so)."""
        return [k for k, s in enumerate(self.splits) if s == split]

    def with_restval(self) -> "Dataset":
        """MSCOCO's restval images as training images (113,287 in all instead of 82,783)."""
        if "restval" not in self.splits:
            return self
        return Dataset(f"{self.name}+restval", list(self.image_ids), list(self.captions),
                       ["train" if s == "restval" else s for s in self.splits], dict(self.missing), self.images)

    def subset(self, indices: list[int]) -> "Dataset":
        return Dataset(self.name, [self.image_ids[k] for k in indices],
                       [self.captions[k] for k in indices], [self.splits[k] for k in indices], dict(self.missing),
                       self.images)

    def resplit(self, seed: int) -> "Dataset":
        """The same images with the split of each drawn at random (``seed``), every split
        keeping its size; seed 0 is the dataset's own split. A re-split is a fresh draw of
        train/val/test images for studies whose differences must hold beyond one split."""
        if seed == 0:
            return self
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.splits))
        splits = [self.splits[k] for k in order]          # the same multiset, shuffled
        return Dataset(f"{self.name}#split{seed}", list(self.image_ids), list(self.captions), splits,
                       dict(self.missing), self.images)

    def with_train_size(self, n: int, seed: int = 0) -> "Dataset":
        """Only ``n`` of the training images, val and test as they are: a point of a
        learning curve. The kept images are the first ``n`` of one permutation of the
        training images drawn with ``seed``, so the sizes of one seed are nested (the
        1,000 images of a curve are among its 2,000)."""
        train = self.split_indices("train")
        if not 0 < n <= len(train):
            raise FnemmError(f"{self.name}: cannot keep {n} training images of {len(train)}")
        if n == len(train):
            return self
        order = np.random.default_rng(seed).permutation(len(train))
        drop = {train[k] for k in order[n:]}
        data = self.subset([k for k in range(len(self.image_ids)) if k not in drop])
        data.name = f"{self.name}#train{n}"
        return data

    def head(self, n: int) -> "Dataset":
        """A small version for quick runs: the first images of each split, about n in all
        (a fifth for val and for test, at least 2 each, the rest train)."""
        share = {"val": max(2, n // 5), "test": max(2, n // 5)}
        share["train"] = max(2, n - share["val"] - share["test"])
        keep = [k for s in ("train", "val", "test") for k in self.split_indices(s)[:share[s]]]
        return self.subset(sorted(keep))

    def to_jsonl(self, path: str | Path) -> Path:
        """Write as a .jsonl that ``load_dataset`` reads back (atomically)."""
        from fnemm.fileio import atomic_write_text
        atomic_write_text(path, "".join(json.dumps({"image": i, "captions": c, "split": s}) + "\n"
                                        for i, c, s in zip(self.image_ids, self.captions, self.splits)))
        return Path(path)

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in (*SPLITS, "restval")}
        for s in self.splits:
            out[s] += 1
        return out

    def summary(self) -> str:
        c = self.counts()
        parts = [f"{c[s]} {s}" for s in (*SPLITS, "restval") if c[s]]
        n_caps = sum(len(x) for x in self.captions)
        return f"{self.name}: {len(self.image_ids)} images ({', '.join(parts)}), {n_caps} captions"


def _norm_split(value, where: str) -> str:
    split = _SPLIT_ALIASES.get(str(value).strip().lower())
    if split is None:
        raise FnemmError(f"{where}: unknown split {value!r}; use train, val (or dev), test or restval")
    return split


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise FnemmError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix or re-download the file") from None
    except UnicodeDecodeError:
        raise FnemmError(f"{path}: not UTF-8 text; is this the right file?") from None


def _build(name: str, order: list[str], caps: dict[str, list[str]], split: dict[str, str],
           source: Path) -> Dataset:
    missing = [i for i in order if not caps.get(i)]
    if missing:
        raise FnemmError(f"{source}: image {missing[0]} has no captions "
                         f"({len(missing)} images without captions)")
    return Dataset(name, order, [caps[i] for i in order], [split[i] for i in order])


# --- Flickr raw release ---------------------------------------------------

_TOKEN_LINE = re.compile(r"^(?P<image>[^\t#]+)#(?P<n>\d+)\t(?P<caption>.*)$")


def read_token_file(path: Path) -> dict[str, list[str]]:
    """``{image: [captions]}`` from a Flickr ``*.token.txt`` file."""
    caps: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def load_flickr_raw(folder: Path, name: str | None = None) -> Dataset:
    """A Flickr release folder: ``*.token.txt`` (or ``*.token``) and the split
    lists ``*trainImages.txt``, ``*devImages.txt``, ``*testImages.txt``.
    Images listed in no split are left out (Flickr8K's token file has one such
    stray entry, ``2258277193_586949ec62.jpg.1``)."""
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
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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
    given = [i for i, s in split.items() if s is not None]
    if given and len(given) < len(split):
        missing = next(i for i, s in split.items() if s is None)
        raise FnemmError(f"{path}: image {missing} has no split while others have one; give every image "
                         f"a split, or none (then they are drawn at random)")
    if given:
        return split
    drawn = auto_splits(list(split))
    counts = {s: sum(1 for v in drawn.values() if v == s) for s in SPLITS}
    print(f"fnemm: {path.name}: no splits given; drew {counts['train']} train / {counts['val']} val / "
          f"{counts['test']} test images at random (seed 0; give a split per image to choose)", file=sys.stderr)
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
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise FnemmError(f"{path}: not UTF-8 text; save the CSV as UTF-8") from None
    except csv.Error as e:
        raise FnemmError(f"{path}: not a readable CSV ({e})") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "image" not in header or "caption" not in header:
        raise FnemmError(f"{path}:1: expected a header with image,caption[,split] columns, got {rows[0] if rows else []}")
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


# --- dispatch --------------------------------------------------------------

def _bundled_flickr8k(name: str, images: str, folder: Path | None, complete: bool) -> Dataset:
    """The official Flickr8K captions and splits of ``folder`` (default: the bundled
    ../shared/data/flickr8k, or $FNEMM_DATA/flickr8k) for the photos in ``folder/images``;
    ``complete``: every image of the official lists must be there."""
    from fnemm.paths import find_data
    folder = folder or find_data("flickr8k")
    photos = folder / images if folder is not None else None
    if photos is None or not photos.is_dir():
        where = folder or "$FNEMM_DATA/flickr8k or ../shared/data/flickr8k"
        raise FnemmError(f"{where}: {name} needs the Flickr8K folder with {images}/ beside the "
                         f"token file; pass --dataset {name}=FOLDER")
    full = load_flickr_raw(folder, name)
    present = {p.name for p in photos.iterdir()}
    keep = [k for k, image in enumerate(full.image_ids) if image in present]
    if not keep:
        raise FnemmError(f"{photos}: none of its files is a Flickr8K image of the official splits")
    if complete and len(keep) < len(full.image_ids):
        absent = [i for i in full.image_ids if i not in present]
        raise FnemmError(f"{photos}: {len(absent)} of the {len(full.image_ids)} images of the official "
                         f"splits are missing (e.g. {absent[0]}); {name} is the whole benchmark: put them "
                         f"there, or use --dataset {folder} with --images for a part")
    data = full.subset(keep)
    data.images = photos
    return data


def load_flickr8k_1k(folder: Path | None = None) -> Dataset:
    """The Flickr8K images that are present in ``folder/images``, official captions and splits."""
    return _bundled_flickr8k("flickr8k-1k", "images", folder, complete=False)


def load_flickr8k_224(folder: Path | None = None) -> Dataset:
    """All of Flickr8K, the paper's benchmark: the official 6,000 / 1,000 / 1,000 split with
    5 captions an image, photos from ``folder/images-224`` (224x224)."""
    return _bundled_flickr8k("flickr8k-224", "images-224", folder, complete=True)


NAMED = {"flickr8k-1k": load_flickr8k_1k, "flickr8k-224": load_flickr8k_224}


def load_dataset(specs: str | Path | list[str | Path]) -> Dataset:
    """Load a dataset from one path (or several COCO captions files).

    A spec is a path, optionally prefixed by ``SPLIT=`` for COCO captions files
    whose names do not say their split.
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    if len(specs) == 1 and str(specs[0]).split("=", 1)[0] in NAMED:
        name, _, folder = str(specs[0]).partition("=")
        return NAMED[name](Path(folder) if folder else None)
    parsed: list[tuple[Path, str | None]] = []
    for spec in specs:
        text = str(spec)
        split = None
        m = re.match(r"^(train|val|dev|test|restval)=(.+)$", text)
        if m:
            split, text = m.group(1), m.group(2)
        path = Path(text)
        if not path.exists():
            raise FnemmError(f"{path}: no such file or folder; pass --dataset a Flickr folder, "
                             f"a dataset_*.json, COCO captions_*.json files or a .jsonl file")
        parsed.append((path, split))
    if len(parsed) > 1 or parsed[0][1] is not None:
        return load_coco_captions(parsed)
    path = parsed[0][0]
    if path.is_dir():
        return load_flickr_raw(path)
    if path.suffix == ".jsonl":
        return load_jsonl(path)
    if path.suffix == ".csv":
        return load_csv(path)
    if path.suffix == ".json":
        data = _read_json(path)
        if isinstance(data, dict) and "annotations" in data:
            return load_coco_captions([(path, None)], data)
        return load_karpathy(path, data)
    if path.name.endswith((".token.txt", ".token")):
        return load_flickr_raw(path.parent)
    raise FnemmError(f"{path}: unknown dataset format; expected a Flickr folder, .json, .jsonl or .csv")
