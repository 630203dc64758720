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
- ``flickr8k-224-all``: the same and the 91 photos of the release that no official list
  names (8,091 photos, 40,455 captions), those as split ``restval``: a whole-release
  search gallery; training and testing see the same 6,000 / 1,000 / 1,000 images.

Image ids are file names (e.g. ``1000268201_693b08cb0e.jpg``): the same ids a
feature store carries.
"""

from __future__ import annotations

import difflib

import re
from pathlib import Path


from fnemm.io.errors import FnemmError

from fnemm.datasets.dataset import SPLITS, Dataset
from fnemm.datasets.formats import (auto_splits, load_coco_captions, load_csv, load_flickr_raw, load_jsonl,
                                    load_karpathy, read_token_file, _read_json)

__all__ = ["SPLITS", "Dataset", "NAMED", "auto_splits", "load_dataset", "read_token_file"]


# --- dispatch --------------------------------------------------------------

def _bundled_flickr8k(name: str, images: str, folder: Path | None, complete: bool,
                      unlisted: bool = False) -> Dataset:
    """The official Flickr8K captions and splits of ``folder`` (default: the bundled
    ../shared/data/flickr8k, or $FNEMM_DATA/flickr8k) for the photos in ``folder/images``;
    ``complete``: every image of the official lists must be there; ``unlisted``: the
    photos there that no list names too, as split ``restval``."""
    from fnemm.io.paths import find_data
    folder = folder or find_data("flickr8k")
    photos = folder / images if folder is not None else None
    if photos is None or not photos.is_dir():
        where = folder or "$FNEMM_DATA/flickr8k or ../shared/data/flickr8k"
        raise FnemmError(f"{where}: {name} needs the Flickr8K folder with {images}/ beside the "
                         f"token file; pass --dataset {name}=FOLDER")
    full = load_flickr_raw(folder, name, unlisted=unlisted)
    present = {p.name for p in photos.iterdir()}
    keep = [k for k, image in enumerate(full.image_ids) if image in present]
    if not keep:
        raise FnemmError(f"{photos}: none of its files is a Flickr8K image of the official splits")
    listed = [i for i, s in zip(full.image_ids, full.splits) if s != "restval"]
    if complete and any(i not in present for i in listed):
        absent = [i for i in listed if i not in present]
        raise FnemmError(f"{photos}: {len(absent)} of the {len(listed)} images of the official "
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


def load_flickr8k_224_all(folder: Path | None = None) -> Dataset:
    """``flickr8k-224`` and the release's photos that no official list names (split
    ``restval``): all 8,091 photos of ``folder/images-224`` and their captions."""
    return _bundled_flickr8k("flickr8k-224-all", "images-224", folder, complete=True, unlisted=True)


NAMED = {"flickr8k-1k": load_flickr8k_1k, "flickr8k-224": load_flickr8k_224, "flickr8k-224-all": load_flickr8k_224_all}
# what --dataset takes, for every help and error that lists it
FORMATS = ("a Flickr folder (token file + split lists), Karpathy's dataset_*.json, COCO captions_*.json files, "
           "a .jsonl of {\"image\", \"captions\", \"split\"} lines, a .csv of image,caption[,split] rows, or a "
           "bundled benchmark: " + ", ".join(NAMED))


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
            close = difflib.get_close_matches(text.split("=", 1)[0], list(NAMED), n=1, cutoff=0.6)
            hint = f"did you mean the bundled {close[0]}? " if close else ""
            raise FnemmError(f"{path}: no such file or folder; {hint}pass --dataset {FORMATS}")
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
    raise FnemmError(f"{path}: unknown dataset format; pass --dataset {FORMATS}")
