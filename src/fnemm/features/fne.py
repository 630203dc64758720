"""The Full-Network Embedding's numerics, as pure functions (paper-spec, "Image side").

    image -> resize 256x256 -> 10 crops of 224 (4 corners + centre, and their mirrors)
          -> CNN, every tap spatially averaged -> mean over crops          (raw)
    raw   -> z-score with mean/std of the *training* images only           (standardise)
          -> {-1, 0, 1} with thresholds (-0.25, 0.15)                      (discretise)
    baseline ("FC7"): the raw activations of one layer, L2-normalised.

Which layers and which of these steps a store uses is its recipe (fnemm.features.recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

RESIZE = 256
CROP = 224
THRESHOLDS = (-0.25, 0.15)


def crop_boxes(size: int = RESIZE, crop: int = CROP, n: int = 10) -> list[tuple[int, int]]:
    """(top, left) of each crop, in torchvision's TenCrop order: top-left, top-right,
    bottom-left, bottom-right, centre (then the same five mirrored)."""
    far, mid = size - crop, (size - crop) // 2
    five = [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]
    if n == 1:
        return [five[4]]
    if n == 10:
        return five + five
    raise ValueError(f"crops={n}: expected 1 or 10")


ORIENTATION = 0x0112                                        # the EXIF tag
BAND = 256                                                  # rows composited at a time


def as_seen(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it, in 8-bit RGB: its first frame, turned upright by its
    EXIF orientation, 16-bit (and other wide integer or float) levels scaled to 8 bits, not
    clipped, transparency composited on white, palettes, greyscale and CMYK converted."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    # Full-size copies are what a 50-megapixel upload costs (~200 MB each), so make only
    # the ones a step needs: none to stay upright, one RGB canvas to composite on.
    if image.getexif().get(ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        levels = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and levels.size and levels.max() <= 1.0:
            levels = levels * 255.0                          # floats in [0, 1]
        elif image.mode != "F" and levels.size and levels.max() > 255:
            levels = levels / 257.0                          # 16-bit: 65,535 -> 255
        image = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBa", "La"):                         # premultiplied: undo it first
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("P", "L", "RGB")
                                              and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        for top in range(0, rgba.height, BAND):             # in bands: no full-size temporaries
            band = rgba.crop((0, top, rgba.width, min(top + BAND, rgba.height)))
            canvas.paste(band.convert("RGB"), (0, top), mask=band.getchannel("A"))  # src*a + white*(1-a)
        return canvas
    return image if image.mode == "RGB" else image.convert("RGB")


def resized(image: Image.Image, size: int = RESIZE) -> Image.Image:
    """The image as the crops are cut from it: as a viewer shows it (``as_seen``), RGB,
    size x size (bilinear). Applying it twice changes nothing, so a large upload can be
    reduced to this early."""
    return as_seen(image).resize((size, size), Image.BILINEAR)


def crops(image: Image.Image, n: int = 10, size: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """(n, crop, crop, 3) uint8 crops of an RGB image resized to size x size."""
    a = np.asarray(resized(image, size))
    out = np.empty((n, crop, crop, 3), np.uint8)
    for k, (top, left) in enumerate(crop_boxes(size, crop, n)):
        c = a[top:top + crop, left:left + crop]
        out[k] = c[:, ::-1] if k >= 5 else c
    return out


@dataclass
class RunningStats:
    """Mean and population variance of rows, merged batch by batch (Chan et al.'s
    parallel update in float64: stable, and the result does not depend on memory)."""
    count: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        n = rows.shape[0]
        if n == 0:
            return
        mean = rows.mean(0)
        m2 = ((rows - mean) ** 2).sum(0)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.count)


def standardise(raw: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """z-scores in float32. A feature constant on the training images (std = 0) carries
    no information from training: its z-score is 0 everywhere, not a division by zero."""
    safe = np.where(std > 0, std, 1.0)
    z = (np.asarray(raw, np.float64) - mean) / safe
    z[:, std <= 0] = 0.0
    return z.astype(np.float32)


def discretise(z: np.ndarray, low: float = THRESHOLDS[0], high: float = THRESHOLDS[1]) -> np.ndarray:
    """-1 below ``low``, 1 above ``high``, else 0, as int8."""
    if not low < high:
        raise ValueError(f"thresholds ({low}, {high}): the low one must be below the high one")
    out = np.zeros(z.shape, np.int8)
    out[z < low] = -1
    out[z > high] = 1
    return out


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)
