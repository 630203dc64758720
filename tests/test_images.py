"""Every image decoded as a person sees it: EXIF orientation applied, 16-bit levels scaled
(not clipped), transparency on white, palettes, CMYK and greyscale converted, the first
frame of an animation; the pixels the crops are cut from equal the plain 8-bit RGB
photo's (and so does the embedding)."""

import io

import numpy as np
import pytest
from PIL import Image

from fnemm.features.fne import resized
from fnemm.features.images import read_image


def photo(size=(120, 90)) -> Image.Image:
    """A photo-like RGB image: smooth gradients and a few shapes, no symmetry (so a
    rotation shows)."""
    y, x = np.mgrid[0:size[1], 0:size[0]]
    a = np.stack([x * 255 / size[0], y * 255 / size[1], (x + 2 * y) % 256], -1)
    a[10:30, 15:60] = (250, 20, 20)
    a[50:80, 80:110] = (20, 20, 240)
    return Image.fromarray(a.astype(np.uint8), "RGB")


def _encode(image: Image.Image, fmt: str, **kwargs) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    buf.seek(0)
    return Image.open(buf)


def _close(a: Image.Image, b: Image.Image, levels: float = 3.0) -> None:
    x = np.asarray(resized(a), np.float64)
    y = np.asarray(resized(b), np.float64)
    assert x.shape == y.shape == (256, 256, 3)
    assert np.abs(x - y).mean() <= levels, np.abs(x - y).mean()
    cos = (x.ravel() @ y.ravel()) / (np.linalg.norm(x) * np.linalg.norm(y))
    assert cos >= 0.999, cos


def test_16_bit_greyscale_is_scaled_not_clipped():
    grey = photo().convert("L")
    wide = Image.fromarray(np.asarray(grey, np.uint16) * 257)        # the same photo in 16 bits
    png = _encode(wide, "PNG")
    assert png.mode.startswith("I")
    _close(png, grey.convert("RGB"))


def test_transparency_is_composited_on_white():
    rgb = photo()
    rgba = rgb.convert("RGBA")
    alpha = np.full(rgb.size[::-1], 255, np.uint8)
    alpha[:, :30] = 0                                                  # a transparent strip
    rgba.putalpha(Image.fromarray(alpha))
    expected = np.asarray(rgb).copy()
    expected[:, :30] = 255
    _close(_encode(rgba, "PNG"), Image.fromarray(expected))
    la = _encode(rgba.convert("LA"), "PNG")
    assert la.mode == "LA"
    _close(la, Image.fromarray(expected).convert("L").convert("RGB"))


def test_palette_cmyk_and_greyscale_convert_as_a_viewer_shows_them():
    rgb = photo()
    _close(_encode(rgb.convert("P", palette=Image.ADAPTIVE, colors=256), "PNG"), rgb, levels=6)
    _close(_encode(rgb.convert("CMYK"), "JPEG", quality=95), rgb, levels=6)
    _close(_encode(rgb.convert("L"), "PNG"), rgb.convert("L").convert("RGB"))


def test_the_first_frame_of_an_animation():
    first, second = photo(), photo().transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    first.save(buf, "GIF", save_all=True, append_images=[second])
    buf.seek(0)
    gif = Image.open(buf)
    gif.seek(1)                                     # left on another frame: still the first is read
    assert gif.n_frames == 2
    _close(gif, _encode(first, "GIF"), levels=1)


def test_exif_orientation_is_applied(tmp_path):
    """A camera's portrait photo: pixels stored sideways and an EXIF tag saying so; read
    upright, as viewers show it (searching with it finds the upright photo)."""
    upright = photo((90, 120))
    stored = upright.transpose(Image.ROTATE_90)                       # as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6                                                  # rotate 90 CW to view
    path = tmp_path / "portrait.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif.tobytes())
    pixels, why, mode = read_image(path)
    assert why is None and pixels.shape == (256, 256, 3)
    reference = np.asarray(resized(upright), np.float64)
    assert np.abs(pixels - reference).mean() < 4
    sideways = np.asarray(resized(stored), np.float64)      # what ignoring the tag would give
    assert np.abs(pixels - sideways).mean() > 20


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "P", "CMYK", "LA"])
def test_uploads_decode_the_same_way(mode):
    from fnemm.features.encode import decode_upload
    rgb = photo()
    image = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257) if mode == "I;16" else rgb.convert(mode)
    buf = io.BytesIO()
    image.save(buf, "JPEG" if mode == "CMYK" else "PNG")
    decoded = np.asarray(decode_upload(buf.getvalue()), np.float64)
    direct = np.asarray(resized(Image.open(io.BytesIO(buf.getvalue()))), np.float64)
    assert np.array_equal(decoded, direct)


def test_an_image_id_is_found_below_the_folder_only_where_its_name_is_one_file(tmp_path):
    """An id not at folder/id is looked for by name below it (COCO's train2014/ and
    val2014/): found when one file has that name, None when none does, and refused when
    two do (two cameras' IMG_0001.jpg), where the first found used to be taken."""
    from fnemm.errors import FnemmError
    from fnemm.features.images import resolve_paths
    for rel in ("top.jpg", "train2014/a.jpg", "cam1/IMG_0001.jpg", "cam2/IMG_0001.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert resolve_paths(tmp_path, ["top.jpg", "a.jpg", "gone.jpg", "cam2/IMG_0001.jpg"]) == [
        tmp_path / "top.jpg", tmp_path / "train2014" / "a.jpg", None, tmp_path / "cam2" / "IMG_0001.jpg"]
    with pytest.raises(FnemmError, match=r"image IMG_0001.jpg is not at .*, and 2 files of that name lie below it "
                                         r"\(cam1/IMG_0001.jpg, cam2/IMG_0001.jpg\)"):
        resolve_paths(tmp_path, ["top.jpg", "IMG_0001.jpg"])


def test_a_folder_lists_the_photos_pillow_reads_and_names_those_it_cannot(tmp_path):
    """Listing a folder (no dataset): JPEG/PNG/... and whatever else this Pillow opens
    (AVIF where it does); an iPhone's HEIC without a plugin, or camera raw, is warned about
    by name, where it used to be passed over in silence."""
    from fnemm.features.images import list_images
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    for name in ("IMG_0001.HEIC", "shot.dng", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    avif = ".avif" in Image.registered_extensions()
    if avif:
        Image.new("RGB", (8, 8)).save(tmp_path / "b.avif")
    with pytest.warns(UserWarning, match=r": 2 photo\(s\) in a format fnemm cannot read are left out \(e.g. "
                                         r"IMG_0001.HEIC\); convert them to JPEG or PNG"):
        listed = list_images(tmp_path)
    assert listed == ["a.jpg"] + (["b.avif"] if avif else [])
