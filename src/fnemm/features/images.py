"""Images for the CNN: finding them, decoding them as the crops are cut from them (in
DataLoader workers that die with the job), and running the CNN over their crops.
Shared by local extraction, extraction on Ray and the encoding of new images."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fnemm.features.cnn import TappedCNN
from fnemm.features.fne import CROP, crop_boxes, resized
from fnemm.io.errors import FnemmError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


# photo formats Pillow opens only in some builds or with a plugin (AVIF; HEIC, iPhones', with
# pillow-heif registered; camera raw never): read where it can, said where it cannot
PHOTO_SUFFIXES_MAYBE = {".avif", ".heic", ".heif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2",
                        ".raf"}


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), as sorted relative paths. Photos in a
    format this Pillow cannot read (an iPhone's HEIC, say) are warned about, not passed over."""
    if not folder.is_dir():
        raise FnemmError(f"{folder}: no such image folder; pass --images DIR")
    readable = IMAGE_SUFFIXES | (PHOTO_SUFFIXES_MAYBE & set(Image.registered_extensions()))
    files = [p for p in folder.rglob("*") if p.is_file()]
    unread = sorted(str(p.relative_to(folder)) for p in files
                    if p.suffix.lower() in PHOTO_SUFFIXES_MAYBE - readable)
    if unread:
        warnings.warn(f"{folder}: {len(unread)} photo(s) in a format fnemm cannot read are left out (e.g. "
                      f"{unread[0]}); convert them to JPEG or PNG", stacklevel=2)
    return sorted(str(p.relative_to(folder)) for p in files if p.suffix.lower() in readable)


def files_by_name(folder: Path, names: set[str] | None = None) -> dict[str, list[Path]]:
    """The files anywhere below ``folder`` by their name (only ``names``, when given): more
    than one under a name means it cannot say which is the photo."""
    found: dict[str, list[Path]] = {}
    for p in folder.rglob("*"):
        if (names is None or p.name in names) and p.is_file():
            found.setdefault(p.name, []).append(p)
    return found


def resolve_paths(folder: Path, ids: list[str]) -> list[Path | None]:
    """Where each image id is: ``folder/id``, else the one file of that name anywhere below
    ``folder`` (COCO keeps train2014/ and val2014/ apart), else None. Two files of that
    name below it (two cameras' IMG_0001.jpg) are an error: either could be the photo."""
    if not folder.is_dir():
        raise FnemmError(f"{folder}: no such image folder; pass --images DIR")
    paths: list[Path | None] = [folder / i for i in ids]
    missing = [k for k, p in enumerate(paths) if not p.is_file()]
    if missing:
        by_name = files_by_name(folder, {Path(ids[k]).name for k in missing})
        for k in missing:
            found = by_name.get(Path(ids[k]).name, [])
            if len(found) > 1:
                where = ", ".join(str(f.relative_to(folder)) for f in sorted(found)[:3])
                raise FnemmError(f"{folder}: image {ids[k]} is not at {folder / ids[k]}, and {len(found)} files of "
                                 f"that name lie below it ({where}); name each image by its path under the "
                                 f"folder in the dataset file")
            paths[k] = found[0] if found else None
    return paths


def read_image(path: Path | None) -> tuple[np.ndarray | None, str | None, str | None]:
    """(the image as the crops are cut from it: RGB, 256 x 256 uint8; why skipped; original
    mode if converted). The crops themselves are cut where the CNN runs (crop_tensor):
    a worker ships 196 KB an image, not ten 224 x 224 crops' 1.5 MB."""
    if path is None:
        return None, "missing: no such file under --images", None
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if img.width < 1 or img.height < 1:
                return None, "empty image", None
            return np.asarray(resized(img)), None, (mode if mode != "RGB" else None)
    except Exception as e:  # noqa: BLE001 (PIL raises many kinds for a corrupt file)
        # the file's name, not where it is: a store's record does not depend on the folder
        why = str(e).replace(str(path), path.name)
        return None, f"unreadable: {type(e).__name__}: {why}".splitlines()[0][:200], None


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path | None]):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, k):
        return (k, *read_image(self.paths[k]))


def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks for reuse instead of returning every large
    activation map to the OS: otherwise each forward pass page-faults its maps in
    anew (measured: 11 s of 53 s in the kernel, ~2x fewer crops/s for MobileNetV2)."""
    _malloc_thresholds(mmap=1 << 30, trim=(1 << 31) - 1)    # heap below 1 GiB, never trimmed back


def return_freed_memory() -> None:
    """The opposite of :func:`keep_freed_memory`, for passes that stream stored rows (no
    forward pass to keep fast): blocks of 4 MiB and more go back to the OS when freed,
    instead of glibc's dynamic thresholds keeping more of each block's temporaries in its
    heap as the blocks go by (--pca with EfficientNet-Lite0's layout: 1,051 -> 1,155 MB
    from 4,000 to 8,000 images with glibc's defaults, 1,024 -> 1,071 MB with these; numpy's
    live arrays 530 -> 550 MB either way)."""
    _malloc_thresholds(mmap=4 << 20, trim=4 << 20)          # fixed, not raised by each free


def _malloc_thresholds(mmap: int, trim: int) -> None:
    """glibc's M_MMAP_THRESHOLD (blocks at least this big are mapped, and unmapped when
    freed) and M_TRIM_THRESHOLD (free heap top kept up to this); setting them ends glibc's
    dynamic adjustment of both."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap)              # M_MMAP_THRESHOLD
        libc.mallopt(-1, trim)              # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass                                # not glibc: nothing to tune


def _worker_init(parent: int, _):
    """A decoding process: one thread, and it dies with the job (as kill -9 would kill
    the job's main process alone, its workers would sleep on forever, holding memory)."""
    torch.set_num_threads(1)          # decoding is the worker's job; the main process runs the CNN
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass                          # not Linux: the parent check below still runs
    if os.getppid() != parent:        # the parent died before prctl took effect
        os._exit(1)


def _collate(items):
    return items


# -- the forward step -------------------------------------------------------------------

def crop_tensor(x: torch.Tensor, n: int = 10, crop: int = CROP) -> torch.Tensor:
    """``fne.crops`` on a tensor, on its device: (B, size, size, 3) uint8 -> (B * n, crop,
    crop, 3), image by image in TenCrop order (corners, centre, then mirrored)."""
    size = x.shape[1]
    parts = []
    for k, (top, left) in enumerate(crop_boxes(size, crop, n)):
        part = x[:, top:top + crop, left:left + crop]
        parts.append(part.flip(2) if k >= 5 else part)
    return torch.stack(parts, 1).reshape(-1, crop, crop, 3)


PRECISIONS = ("fp32", "bf16")


def forward_images(cnn: TappedCNN, images_u8: np.ndarray, n_crops: int, device: str,
                   precision: str = "fp32") -> np.ndarray:
    """(B, 256, 256, 3) uint8 images as ``read_image`` gives them -> (B, dim) crop-averaged
    tap outputs, float32. Crops, mirrors and normalisation run on ``device`` (from pinned
    memory on a GPU); ``precision`` bf16 runs the CNN under bfloat16 autocast."""
    x = torch.from_numpy(np.require(images_u8, requirements=["C", "W"]))     # copied only if read-only
    if device.startswith("cuda"):
        x = x.pin_memory().to(device, non_blocking=True)
    x = crop_tensor(x, n_crops)
    if precision == "bf16":
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            out = cnn(x)
    else:
        out = cnn(x)
    return out.float().view(-1, n_crops, cnn.dim).mean(1).cpu().numpy()


