"""Paper-style tables and plots from run folders.

A run folder is what ``fnemm train --out`` wrote (config.json, run.json,
metrics.jsonl, best.pt) plus ``metrics-SPLIT.json`` from ``fnemm evaluate``; a
seeds folder holds ``seed-0/``, ``seed-1/``... of such runs and is reported as
mean +- std over its seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fnemm.errors import FnemmError
from fnemm.fileio import atomic_path
from fnemm.runs import load_metrics, saved_info, seed_dirs, val_curve

COLUMNS = ["i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "rsum"]
HEADER = ["R@1", "R@5", "R@10", "Med r", "R@1", "R@5", "R@10", "Med r", "rsum"]

# Target numbers of ../shared/paper-spec.md (test, 1K images; the paper gives no
# median ranks in that table): i2t R@1/5/10, t2i R@1/5/10.
PAPER = {
    "flickr8k": {"FNE-MH": (27.3, 56.8, 69.3, 21.2, 47.1, 59.7), "FC7-MH": (23.0, 49.0, 63.3, 18.5, 43.2, 56.1)},
    "flickr30k": {"FNE-MH": (37.7, 66.6, 78.6, 27.8, 56.0, 67.1), "FC7-MH": (33.6, 59.4, 69.3, 23.6, 50.0, 61.8)},
    "coco": {"FNE-MH": (50.2, 80.5, 90.5, 37.2, 71.9, 83.0), "FC7-MH": (44.6, 75.8, 85.7, 34.1, 68.2, 80.7)},
}


@dataclass
class RunSummary:
    label: str
    path: Path
    seeds: list[dict[str, float]]                 # test metrics per seed
    curves: list[list[float]] = field(default_factory=list)   # val rsum per epoch, per seed
    preset: str | None = None

    def mean_std(self, key: str) -> tuple[float, float]:
        values = np.array([s[key] for s in self.seeds], dtype=np.float64)
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _label(preset: str | None, path: Path) -> str:
    return preset.split("/")[-1] if preset else path.name


def _preset(run: Path) -> str | None:
    """The preset a run was trained from: its run.json says, else its best.pt."""
    if (run / "run.json").exists():
        return saved_info(run).get("preset")
    if (run / "best.pt").exists():
        from fnemm.checkpoint import read_checkpoint
        return read_checkpoint(run / "best.pt").get("preset")
    return None


def load_run(path: str | Path, split: str = "test") -> RunSummary:
    path = Path(path)
    if not path.is_dir():
        raise FnemmError(f"{path}: no such run folder")
    seeds, curves, preset = [], [], None
    for run in seed_dirs(path):
        results = load_metrics(run, split)
        seeds.append(next(iter(results.values())))      # the whole split (first protocol)
        curve = val_curve(run)
        if curve:
            curves.append(curve)
        if preset is None:
            preset = _preset(run)
    return RunSummary(_label(preset, path), path, seeds, curves, preset)


def _cell(run: RunSummary, key: str) -> str:
    mean, std = run.mean_std(key)
    digits = 0 if key.endswith("medr") else 1
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(run.seeds) > 1 else f"{mean:.{digits}f}"


def markdown_table(runs: list[RunSummary], paper: str | None = None) -> str:
    """Rows per run (mean ± std over seeds), and the paper's rows for ``paper`` (a dataset family)."""
    lines = ["| model | seeds | " + " | ".join(HEADER) + " |",
             "|---|---|" + "---|" * len(HEADER),
             "| | | annotation (image → text) | | | | retrieval (text → image) | | | | |"]
    for run in runs:
        lines.append(f"| {run.label} | {len(run.seeds)} | " + " | ".join(_cell(run, k) for k in COLUMNS) + " |")
    if paper:
        if paper not in PAPER:
            raise FnemmError(f"--paper {paper}: the paper's numbers exist for {', '.join(PAPER)}")
        for name, (a1, a5, a10, r1, r5, r10) in PAPER[paper].items():
            rsum = a1 + a5 + a10 + r1 + r5 + r10
            lines.append(f"| paper {paper} {name} | | {a1} | {a5} | {a10} | – | {r1} | {r5} | {r10} | – | {rsum:.1f} |")
    return "\n".join(lines)


def plot_curves(runs: list[RunSummary], path: str | Path) -> Path:
    """Validation rsum per epoch for every run (one line per seed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for k, run in enumerate(runs):
        color = f"C{k % 10}"
        for s, curve in enumerate(run.curves):
            ax.plot(range(1, len(curve) + 1), curve, color=color, alpha=0.9 if s == 0 else 0.45,
                    label=run.label if s == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation rsum")
    ax.set_title("Validation rsum (R@1+R@5+R@10, both directions) per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def contact_sheet(title: str, images: list[tuple[Path, str]], path: str | Path, thumb: int = 200) -> Path:
    """A row of thumbnails with a caption line under each, and ``title`` above."""
    from PIL import Image, ImageDraw
    n = max(len(images), 1)
    pad, text_h, title_h = 8, 36, 28
    sheet = Image.new("RGB", (n * (thumb + pad) + pad, title_h + thumb + text_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), title, fill="black")
    for k, (file, label) in enumerate(images):
        x = pad + k * (thumb + pad)
        with Image.open(file) as img:
            img = img.convert("RGB")
            img.thumbnail((thumb, thumb))
            sheet.paste(img, (x + (thumb - img.width) // 2, title_h + (thumb - img.height) // 2))
        for line_no, line in enumerate(_wrap(label, 30)[:2]):
            draw.text((x, title_h + thumb + 4 + 14 * line_no), line, fill="black")
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def chance_rsum(n_images: int, captions_per_image: int = 5, draws: int = 20, seed: int = 0) -> tuple[float, float]:
    """rsum (mean, std) of random embeddings on a split of this size: the level to beat."""
    import torch
    from fnemm.metrics import evaluate_embeddings
    g = torch.Generator().manual_seed(seed)
    owner = torch.from_numpy(np.repeat(np.arange(n_images), captions_per_image))
    values = []
    for _ in range(draws):
        img = torch.nn.functional.normalize(torch.randn(n_images, 64, generator=g), dim=1)
        cap = torch.nn.functional.normalize(torch.randn(len(owner), 64, generator=g), dim=1)
        values.append(evaluate_embeddings(img, cap, owner, "cosine")["rsum"])
    return float(np.mean(values)), float(np.std(values))
