"""Contact sheets a person can judge: retrieval examples in both directions, the right
answers marked, in type large enough to read.

    text -> images   a test caption, then its top 5 images (rank, score), the true image
                     framed in green; when it ranked lower, it is added at the end with its rank
    image -> text    a test image, then its top 5 captions (rank, score), its own in green
                     captions; the best-ranked of them added when none made the top 5
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from fnemm.features.fne import as_seen

from fnemm.io.files import atomic_path

THUMB, PAD = 190, 10
GREEN, GREY = (20, 150, 60), (110, 110, 110)


def _font(size: int):
    return ImageFont.load_default(size=size)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def _thumb(path: Path | None) -> Image.Image:
    if path is None or not Path(path).is_file():
        return Image.new("RGB", (THUMB, THUMB), (230, 230, 230))
    with Image.open(path) as img:
        img = as_seen(img)
        img.thumbnail((THUMB, THUMB))
        return img.copy()


def _save(sheet: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def text_to_image_sheet(gallery, queries: list[tuple[str, str]], path: str | Path, k: int = 5) -> Path:
    """One row per (caption, its true image id): the caption, then the top-``k`` images."""
    title, label = _font(18), _font(15)
    row_h = 34 + THUMB + 44
    width = PAD + (k + 1) * (THUMB + PAD)
    sheet = Image.new("RGB", (width, PAD + row_h * len(queries)), "white")
    draw = ImageDraw.Draw(sheet)
    for q, (caption, truth) in enumerate(queries):
        y = PAD + q * row_h
        draw.text((PAD, y), f'"{caption}"'[:110], fill="black", font=title)
        hits = gallery.text(caption, k)
        cells = [(h.image, h.rank, h.score) for h in hits]
        if truth not in [h.image for h in hits] and truth in gallery:
            cells.append((truth, gallery.rank_of(caption, truth), None))
        for c, (image, rank, score) in enumerate(cells):
            x = PAD + c * (THUMB + PAD)
            img = _thumb(gallery.image_path(image))
            top = y + 30
            sheet.paste(img, (x + (THUMB - img.width) // 2, top + (THUMB - img.height) // 2))
            right = image == truth
            if right:
                draw.rectangle([x - 3, top - 3, x + THUMB + 2, top + THUMB + 2], outline=GREEN, width=5)
            text = f"#{rank}" + (f"  {score:+.3f}" if score is not None else "") + ("  true image" if right else "")
            draw.text((x, top + THUMB + 6), text, fill=GREEN if right else "black", font=label)
    return _save(sheet, path)


def image_to_text_sheet(gallery, images: list[str], path: str | Path, k: int = 5) -> Path:
    """One row per test image: the image, then its top-``k`` captions, its own marked."""
    font = _font(16)
    line_h, width = 22, 1100
    rows = []
    for image in images:
        hits = gallery.image(image, k)
        lines = [(h.rank, h.score, h.caption, h.image == image) for h in hits]
        if not any(ok for *_, ok in lines):
            own = gallery.image(image, 100)
            first = next((h for h in own if h.image == image), None)
            if first is not None:
                lines.append((first.rank, first.score, first.caption, True))
        rows.append((image, lines))
    row_h = max(THUMB, 0) + 2 * PAD
    sheet = Image.new("RGB", (width, PAD + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (image, lines) in enumerate(rows):
        y = PAD + r * row_h
        img = _thumb(gallery.image_path(image))
        sheet.paste(img, (PAD + (THUMB - img.width) // 2, y + (THUMB - img.height) // 2))
        x, yy = 2 * PAD + THUMB, y
        for rank, score, caption, ok in lines:
            for n, part in enumerate(_wrap(f"#{rank} {score:+.3f}  {'(its own) ' if ok else ''}{caption}", 95)[:2]):
                draw.text((x + (28 if n else 0), yy), part, fill=GREEN if ok else "black", font=font)
                yy += line_h
        if not lines:
            draw.text((x, yy), "(no captions)", fill=GREY, font=font)
    return _save(sheet, path)
