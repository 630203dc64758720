"""New images into a feature store's space, and untrusted image bytes decoded safely.

:class:`StoreEncoder` makes the features of an image that is not in a store exactly
as the store made its own: the same CNN and weights (checked by sha256), crops,
training statistics, layers and post-processing (``fnemm.features.recipe``).
:func:`decode_upload` turns bytes from a client into an RGB image or a one-line
error with the HTTP status it deserves (413 too large, 415 not an image).
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from fnemm.features.cnn import TappedCNN, build_cnn
from fnemm.io.errors import FnemmError, NotAnImage, TooLarge
from fnemm.features.assembly import read_manifest, recipe_of, store_encoder
from fnemm.features.extraction import ExtractConfig
from fnemm.features.images import forward_images, read_image
from fnemm.io.files import sha256_file
from fnemm.features.fne import resized

MAX_PIXELS = 50_000_000            # bigger images are refused before decoding (decompression bombs)


def store_weights(store: Path, manifest: dict) -> str | None:
    """The CNN weights a store was extracted with, for new images to go through the same
    network: the very same file (sha256 checked), or the builder's own when it had no file."""
    weights = manifest.get("weights")
    if manifest.get("weights_sha256"):
        if not weights or not Path(weights).is_file():
            raise FnemmError(f"{store}: its CNN weights {weights} are not here; embedding a new image "
                             f"needs the same weights file at that path")
        if sha256_file(weights) != manifest["weights_sha256"]:
            raise FnemmError(f"{weights}: changed since {store} was extracted (sha256 differs); "
                             f"re-extract the store or restore the file")
        return weights
    return weights if weights == "random" else None     # the builder's own (e.g. a seeded test network)


def extract_config_of(store: str | Path, device: str = "cpu", **overrides) -> ExtractConfig:
    """The extraction settings that made ``store`` (CNN, weights, crops, layers and
    post-processing), for other images to be extracted into its space with its statistics."""
    store = Path(store)
    manifest = read_manifest(store)
    try:
        if not isinstance(manifest["cnn"], str) or not isinstance(manifest.get("precision", "fp32"), str):
            raise TypeError("cnn / precision")
        return ExtractConfig(cnn=manifest["cnn"], weights=store_weights(store, manifest),
                             crops=int(manifest["crops"]), recipe=recipe_of(manifest), device=device,
                             precision=manifest.get("precision", "fp32"), **overrides)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FnemmError(f"{store / 'manifest.json'}: damaged ({type(e).__name__}: {str(e)[:80]}); re-run "
                         f"`fnemm extract` into {store} (or `fnemm extract --verify`)") from None


class _Waiting:
    """One image waiting for the CNN, and then its raw row (or the error of its batch)."""

    def __init__(self, pixels: np.ndarray):
        self.pixels, self.raw, self.error, self.done = pixels, None, None, False


class StoreEncoder:
    """Features of new images made exactly as a feature store's were.

    Thread-safe: the CNN's taps collect into one buffer, so forward passes take turns. On
    a GPU they are also shared: the thread whose turn it is takes every image waiting by
    then (up to ``batch_size``, 8 as extraction's batches) into one pass, so that uploads
    arriving together do not queue for a pass each while one photo's 10 crops leave the
    GPU mostly idle. On a CPU a photo's 10 crops already fill the cores: shared passes
    measured 0.86-0.91x the photos a second of one pass each (bench/upload_speed.py, 2
    cores), so ``batch_size`` is 1 there. Batch-mates move a photo's features by float
    rounding only, as they move a store's rows (extracted 8 at a time): FNE rows at cosine
    above 0.999 to the photo's alone (tests/test_serve.py)."""

    def __init__(self, store: str | Path, device: str = "cpu"):
        self.store = Path(store)
        self.encoder, self.manifest = store_encoder(self.store)
        m = self.manifest
        self.cnn: TappedCNN = build_cnn(m["cnn"], store_weights(self.store, m)).to(device)
        self.device, self.crops = device, int(m["crops"])
        self.batch_size = ExtractConfig.batch_size if device.startswith("cuda") else 1
        self._lock = threading.Lock()          # one forward pass at a time
        self._queue_lock = threading.Lock()    # the images waiting for one
        self._waiting: list[_Waiting] = []

    def encode(self, path: str | Path) -> dict[str, np.ndarray]:
        """{'raw', 'fne', 'fc7'} rows (1, D) of one image file."""
        pixels, why, _ = read_image(Path(path) if Path(path).is_file() else None)
        if why is not None:
            raise NotAnImage(f"{Path(path).name}: cannot use this image ({why}); give a JPEG/PNG photo")
        return self._encode(pixels)

    def encode_image(self, image: Image.Image) -> dict[str, np.ndarray]:
        """As :meth:`encode`, for an image already decoded (e.g. an upload)."""
        return self._encode(np.asarray(resized(image)))

    def _encode(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        mine = _Waiting(pixels)
        with self._queue_lock:
            self._waiting.append(mine)
        while not mine.done:
            with self._lock:
                if mine.done:                  # another thread's pass carried it
                    break
                with self._queue_lock:         # the oldest waiting images, this one among them in time
                    batch, self._waiting = self._waiting[:self.batch_size], self._waiting[self.batch_size:]
                self._forward(batch)
        if mine.error is not None:
            raise mine.error
        return {"raw": mine.raw, **self.encoder(mine.raw)}

    def _forward(self, batch: list[_Waiting]) -> None:
        try:
            raw = forward_images(self.cnn, np.stack([w.pixels for w in batch]), self.crops, self.device,
                                 self.manifest.get("precision", "fp32")).astype(np.float16)
            for w, row in zip(batch, raw):
                w.raw = row[None]
        except BaseException as e:  # noqa: BLE001 - every image of the pass gets its error
            for w in batch:
                w.error = e
        finally:
            for w in batch:
                w.pixels, w.done = None, True


def decode_upload(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image from untrusted bytes: refused before decoding when it declares more than
    ``max_pixels`` (413), or when it is not an image PIL reads whole (415); returned
    already reduced to what the crops are cut from (``fne.resized``: the same pixels as
    reducing it later), so a 50-megapixel upload's ~200 MB live only while decoding."""
    if not data:
        raise FnemmError(f"{name}: the upload is empty; send a JPEG/PNG photo")
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise TooLarge(f"{name}: {image.width}x{image.height} pixels; at most {max_pixels // 1_000_000} megapixels")
        image.load()
    except TooLarge:
        raise
    except Image.DecompressionBombError:
        raise TooLarge(f"{name}: too many pixels; at most {max_pixels // 1_000_000} megapixels") from None
    except Exception:  # noqa: BLE001 - PIL raises many kinds for a damaged or foreign file
        raise NotAnImage(f"{name}: not an image this server can read; send a JPEG/PNG photo") from None
    if image.width < 1 or image.height < 1:
        raise NotAnImage(f"{name}: the image is empty")
    return resized(image)
