"""Paper-style tables with uncertainty, and plots, from evaluated run folders.

A run folder is what ``fnemm train --out`` wrote (config.json, run.json,
metrics.jsonl, best.pt) plus ``metrics-SPLIT.json`` and ``ranks-SPLIT.jsonl`` from
``fnemm evaluate``; a seeds folder holds ``seed-0/``, ``seed-1/``... of such runs. Each
row gives every recall, median and mean rank (mean over seeds), and its rsum with a
95% bootstrap interval over the test images (and the seeds); with a baseline, each
other row's paired difference from it (the same test images in every draw).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fnemm.io.errors import FnemmError
from fnemm.io.files import atomic_path
from fnemm.joint.checkpoint import unfinished
from fnemm.training.folders import (label_of, load_metrics, load_ranks, metrics_path, run_preset, saved_info, seed_dirs,
                                    val_curve)
from fnemm.eval.metrics import chance_rsum
from fnemm_studies.stats import Comparison, bootstrap_rsum, format_p, paired_bootstrap

DIRECTIONS = ("i2t", "t2i")
COLUMNS = [f"{d}_{m}" for d in DIRECTIONS for m in ("r1", "r5", "r10", "medr", "meanr")]
HEADER = [f"{d} {m}" for d in DIRECTIONS for m in ("R@1", "R@5", "R@10", "Med r", "Mean r")]
LEGEND = ("i2t: image annotation (an image -> its captions), t2i: image retrieval (a caption -> its image); "
          "R@K in %, Med r / Mean r: median / mean rank of the first right answer (mean over seeds).")

# The paper's Tables 2-4 (test, 1K images): i2t R@1, R@5, R@10, Med r, t2i R@1, R@5, R@10, Med r.
PAPER = {
    "flickr8k": {
        "FC7-SH-bl": (21.0, 45.7, 60.4, 7, 14.0, 35.8, 48.6, 11),
        "FNE-SH-bl": (23.3, 50.8, 66.8, 5, 15.0, 38.2, 51.6, 10),
        "FC7-SH": (22.4, 49.8, 62.9, 6, 16.6, 41.2, 54.3, 8),
        "FNE-SH": (25.0, 50.8, 64.3, 5, 18.6, 44.9, 58.0, 7),
        "FC7-MH-bl": (22.6, 48.6, 61.9, 6, 17.7, 42.7, 54.9, 8),
        "FNE-MH-bl": (24.2, 52.0, 65.2, 5, 19.4, 44.3, 57.3, 7),
        "FC7-MH": (23.0, 49.0, 63.3, 6, 18.5, 43.2, 56.1, 8),
        "FNE-MH": (27.3, 56.8, 69.3, 4, 21.2, 47.1, 59.7, 6),
        "FC7-SOE-bl": (20.6, 45.4, 58.0, 7, 15.4, 38.8, 52.7, 9),
        "FNE-SOE-bl": (21.5, 48.5, 60.7, 6, 16.2, 40.7, 53.8, 9),
        "FC7-SOE": (21.2, 48.1, 61.7, 6, 17.8, 43.6, 56.5, 8),
        "FNE-SOE": (24.0, 52.4, 63.9, 5, 18.7, 44.2, 57.7, 7),
        "FC7-MOE-bl": (22.6, 48.2, 62.3, 6, 16.9, 41.5, 54.2, 9),
        "FNE-MOE-bl": (0.1, 0.3, 0.4, 2476, 0.1, 0.5, 1.0, 501),
        "FC7-MOE": (21.5, 46.1, 60.0, 7, 15.6, 39.0, 51.9, 9),
        "FNE-MOE": (25.5, 55.5, 67.8, 4, 18.7, 44.4, 58.4, 7),
        "FC7-PH": (22.9, 48.8, 62.5, 6, 17.1, 41.7, 54.6, 8),
        "FNE-PH": (26.3, 55.7, 68.5, 4, 20.5, 45.8, 58.1, 7),
        "FC7-POE": (21.0, 48.3, 62.0, 6, 16.9, 41.7, 55.3, 8),
        "FNE-POE": (26.2, 53.6, 65.8, 5, 19.7, 45.6, 58.4, 7),
    },
    "flickr30k": {
        "FC7-SH-bl": (30.4, 58.0, 69.5, 4, 18.9, 44.6, 57.0, 7),
        "FNE-SH-bl": (30.4, 61.8, 73.2, 3, 22.1, 47.6, 59.8, 6),
        "FC7-SH": (32.4, 60.9, 72.6, 3, 24.1, 51.1, 64.1, 5),
        "FNE-SH": (36.4, 64.6, 75.7, 3, 25.5, 53.8, 65.7, 5),
        "FC7-MH-bl": (29.5, 59.9, 70.8, 4, 23.0, 48.9, 60.4, 6),
        "FNE-MH-bl": (34.7, 63.1, 75.6, 3, 25.1, 52.3, 64.7, 5),
        "FC7-MH": (33.6, 59.4, 69.3, 3, 23.6, 50.0, 61.8, 5),
        "FNE-MH": (37.7, 66.6, 78.6, 2, 27.8, 56.0, 67.1, 4),
        "FC7-SOE-bl": (31.6, 60.0, 72.4, 3, 24.0, 52.1, 64.1, 5),
        "FNE-SOE-bl": (33.7, 63.8, 75.3, 3, 26.0, 55.1, 67.7, 4),
        "FC7-SOE": (30.2, 59.4, 70.4, 4, 23.8, 50.5, 62.7, 5),
        "FNE-SOE": (35.5, 63.4, 75.3, 3, 26.8, 56.1, 67.5, 4),
        "FC7-MOE-bl": (31.1, 56.2, 67.8, 4, 20.8, 47.1, 58.2, 7),
        "FNE-MOE-bl": (0.1, 0.4, 0.4, 2461, 0.1, 0.5, 0.9, 498),
        "FC7-MOE": (31.9, 61.3, 72.7, 3, 23.8, 50.2, 61.5, 5),
        "FNE-MOE": (35.3, 65.0, 77.1, 3, 27.3, 55.2, 68.0, 4),
        "FC7-PH": (31.8, 60.1, 73.6, 3, 24.0, 51.8, 63.3, 5),
        "FNE-PH": (36.6, 63.9, 75.0, 3, 25.9, 54.3, 66.2, 4),
        "FC7-POE": (31.4, 60.9, 72.3, 3, 24.5, 51.3, 63.7, 5),
        "FNE-POE": (37.2, 67.1, 77.9, 2, 28.1, 57.8, 69.1, 4),
    },
    "coco": {
        "FC7-SH-bl": (41.2, 72.8, 85.1, 2, 26.2, 58.6, 73.9, 4),
        "FNE-SH-bl": (47.3, 76.8, 85.8, 2, 31.4, 65.4, 78.7, 3),
        "FC7-SH": (44.0, 77.0, 86.0, 2, 33.6, 68.8, 81.1, 3),
        "FNE-SH": (50.6, 80.0, 88.4, 1, 36.7, 71.3, 82.7, 2),
        "FC7-MH-bl": (43.8, 74.7, 84.5, 2, 32.8, 67.5, 80.5, 3),
        "FNE-MH-bl": (49.6, 78.9, 89.5, 2, 37.5, 72.1, 83.6, 2),
        "FC7-MH": (44.6, 75.8, 85.7, 2, 34.1, 68.2, 80.7, 3),
        "FNE-MH": (50.2, 80.5, 90.5, 1, 37.2, 71.9, 83.0, 2),
        "FC7-SOE-bl": (41.5, 74.4, 86.0, 2, 33.8, 69.0, 82.6, 3),
        "FNE-SOE-bl": (47.1, 78.5, 89.6, 2, 36.8, 71.6, 84.2, 2),
        "FC7-SOE": (44.3, 74.8, 84.4, 2, 34.9, 69.2, 81.9, 3),
        "FNE-SOE": (46.7, 79.8, 88.9, 2, 36.4, 72.8, 84.7, 2),
        "FC7-MOE-bl": (40.7, 75.3, 85.9, 2, 32.2, 66.4, 78.3, 3),
        "FNE-MOE-bl": (0.1, 0.3, 0.4, 2472, 0.1, 0.5, 0.9, 499),
        "FC7-MOE": (43.9, 75.4, 84.9, 2, 34.2, 68.0, 81.2, 3),
        "FNE-MOE": (47.1, 79.6, 88.3, 2, 36.6, 71.7, 83.3, 2),
        "FC7-PH": (45.3, 75.0, 85.5, 2, 33.8, 68.4, 81.0, 3),
        "FNE-PH": (50.6, 80.0, 88.4, 1, 36.7, 71.3, 82.7, 2),    # as printed: the same as FNE-SH
        "FC7-POE": (45.6, 75.9, 86.6, 2, 35.2, 69.7, 83.1, 2),
        "FNE-POE": (48.2, 81.5, 89.7, 2, 38.8, 73.5, 85.0, 2),
    },
}


@dataclass
class RunSummary:
    label: str
    path: Path
    seeds: list[dict[str, float]]                 # test metrics per seed
    curves: list[list[float]] = field(default_factory=list)   # val rsum per epoch, per seed
    preset: str | None = None
    ranks: list[dict] = field(default_factory=list)           # per-query test ranks, per seed (if saved)
    val_chance: tuple[float, float] | None = None             # rsum of random embeddings on its val split
    split: str = "test"                                       # the split its metrics are of

    def test_chance(self) -> tuple[int, int, float, float] | None:
        """(test images, captions an image, chance rsum mean, std) of its test split: the
        counts from its per-query ranks, else from its metrics."""
        if self.ranks:
            images, captions = len(self.ranks[0]["i2t"]), len(self.ranks[0]["t2i"])
        elif "images" in self.seeds[0] and "captions" in self.seeds[0]:
            images, captions = self.seeds[0]["images"], self.seeds[0]["captions"]
        else:
            return None
        per = max(1, round(captions / images))
        return (images, per, *chance_rsum(images, per))

    def at_chance(self) -> bool:
        chance = self.test_chance()
        return chance is not None and self.mean_std("rsum")[0] <= chance[2] + 2 * chance[3]

    def mean_std(self, key: str) -> tuple[float, float]:
        values = np.array([s[key] for s in self.seeds], dtype=np.float64)
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0

    def interval(self, draws: int = 2000) -> tuple[float, float] | None:
        """95% bootstrap interval of the mean rsum over test images (and seeds)."""
        if len(self.ranks) != len(self.seeds) or not self.ranks:
            return None
        low, high, _ = bootstrap_rsum(self.ranks, draws)
        return low, high


def test_images(run: RunSummary) -> tuple | None:
    """What ``run`` was scored on: its seeds' test image ids (from their ranks), or only how
    many (from their metrics); None when neither says."""
    if run.ranks:
        return tuple(tuple(r["images"]) for r in run.ranks)
    counts = tuple(s.get("images") for s in run.seeds)
    return None if None in counts else counts


def scored_apart(runs: list[RunSummary]) -> str | None:
    """A note when ``runs`` (or one run's seeds) were scored on different test images: their
    rsums are then not comparable (125 test images give far higher recalls than 1,000)."""
    sigs = [(run.label, test_images(run)) for run in runs]
    if any(v is None for _, v in sigs):
        return None
    if not all(run.ranks for run in runs):          # some only say how many: compare the counts
        sigs = [(label, tuple(len(x) if isinstance(x, tuple) else x for x in v)) for label, v in sigs]
    if len({x for _, v in sigs for x in v}) < 2:
        return None
    groups: dict[str, list[str]] = {}
    for label, v in sigs:
        sizes = " / ".join(str(len(x) if isinstance(x, tuple) else x) for x in dict.fromkeys(v))
        groups.setdefault(sizes, []).append(label)
    said = ("; ".join(f"{', '.join(labels)}: {n} images" for n, labels in groups.items()) if len(groups) > 1
            else f"{next(iter(groups))} images each, not the same ones")
    return (f"not comparable: these runs were scored on different {runs[0].split} images ({said}); a row on "
            f"other images than the baseline has no paired difference, and their rsums cannot be ranked")


def load_run(path: str | Path, split: str = "test") -> RunSummary:
    path = Path(path)
    if not path.is_dir():
        raise FnemmError(f"{path}: no such run folder")
    seeds, curves, ranks, preset, label, chance = [], [], [], None, None, None
    for run in seed_dirs(path):
        if not metrics_path(run, split).exists() and unfinished(run):
            raise FnemmError(f"{run}: still training, or stopped before its end (`fnemm train --out {run} --resume` "
                             f"finishes it); wait for it, or name the seeds that have finished (e.g. "
                             f"{seed_dirs(path)[0]})")
        results = load_metrics(run, split)
        seeds.append(next(iter(results.values())))      # the whole split (first protocol)
        curve = val_curve(run)
        if curve:
            curves.append(curve)
        if (r := load_ranks(run, split)) is not None:
            _check_ranks(r, seeds[-1], run, split)
            ranks.append(r)
        if preset is None:
            preset = run_preset(run)
            if (run / "run.json").exists():       # a name of its own (the demo's FNE-late-MH)
                info = saved_info(run)
                label = info.get("label")
                vc = info.get("val_chance")
                chance = (float(vc["rsum"]), float(vc["std"])) if isinstance(vc, dict) and "rsum" in vc else None
    return RunSummary(label or label_of(preset, path), path, seeds, curves, preset, ranks, chance, split)


def _check_ranks(ranks: dict, metrics: dict, run: Path, split: str) -> None:
    """The per-query ranks must give the metrics saved beside them (the same evaluation)."""
    import torch

    from fnemm.eval.metrics import metrics_from_ranks
    again = metrics_from_ranks(torch.tensor(ranks["i2t"]), torch.tensor(ranks["t2i"]))
    counts = {"images": len(ranks["i2t"]), "captions": len(ranks["t2i"])}
    if any(abs(again[k] - metrics[k]) > 1e-6 for k in again) or \
            any(k in metrics and metrics[k] != v for k, v in counts.items()):
        raise FnemmError(f"{run / f'ranks-{split}.jsonl'}: does not give the metrics of {f'metrics-{split}.json'} "
                         f"beside it (one of them is damaged); evaluate the run again: fnemm evaluate "
                         f"--checkpoint {run} --split {split} ...")


def _cell(run: RunSummary, key: str) -> str:
    mean, std = run.mean_std(key)
    digits = 0 if key.endswith("medr") else 1
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(run.seeds) > 1 else f"{mean:.{digits}f}"


def default_baseline(runs: list[RunSummary]) -> RunSummary | None:
    """The FC7 run among FNE ones (the paper's comparison), else None."""
    fc7 = [r for r in runs if r.label.startswith("FC7-")]
    return fc7[0] if fc7 and any(r.label.startswith("FNE-") for r in runs) else None


def compare(run: RunSummary, baseline: RunSummary, draws: int = 2000) -> Comparison | None:
    """``run`` minus ``baseline`` in rsum, paired over the same test images (None when their
    per-query ranks are missing or come from other test images)."""
    if not run.ranks or not baseline.ranks or any(r["images"] != run.ranks[0]["images"]
                                                  for r in [*run.ranks, *baseline.ranks]):
        return None
    return paired_bootstrap(run.ranks, baseline.ranks, draws)


def markdown_table(runs: list[RunSummary], paper: str | None = None, baseline: RunSummary | None = None) -> str:
    """A row per run: recalls and ranks (mean ± std over seeds), rsum with its 95% interval,
    and its paired difference from ``baseline``; then the paper's rows of the same
    pipelines for ``paper`` (a dataset family)."""
    versus = f" | vs {baseline.label}: Δ rsum [95%], p" if baseline else ""
    lines = [f"| model | seeds | {' | '.join(HEADER)} | rsum [95% interval]{versus} |",
             "|---|---:|" + "---:|" * len(HEADER) + "---:|" + ("---|" if baseline else "")]
    for run in runs:
        ci = run.interval()
        rsum = _cell(run, "rsum") + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
        cells = " | ".join(_cell(run, k) for k in COLUMNS)
        diff = ""
        if baseline is not None:
            c = compare(run, baseline) if run is not baseline else None
            diff = " | " + (f"{c.mean:+.1f} [{c.low:+.1f}, {c.high:+.1f}], {format_p(c.p)}" if c else "–")
        lines.append(f"| {run.label} | {len(run.seeds)} | {cells} | {rsum}{diff} |")
    missing = [run for run in runs if len(run.ranks) != len(run.seeds)]
    shapes = {c[:2]: c for run in runs if (c := run.test_chance()) is not None}
    for n, per, mean, std in shapes.values():
        lines.append(f"| chance: random embeddings, {n} images x {per} captions | | " + "– | " * len(HEADER)
                     + f"{mean:.1f} ± {std:.1f} |" + (" |" if baseline else ""))
    notes = [f"{run.label} is at chance: its rsum, {run.mean_std('rsum')[0]:.1f}, is within 2 std of chance's "
             f"{run.test_chance()[2]:.1f}; it has learnt nothing the test images can tell" for run in runs
             if run.at_chance()]
    notes += [f"{run.label}: no interval, its per-query ranks (ranks-{run.split}.jsonl) are missing: evaluate it "
              f"again" for run in missing]
    notes += [apart] if (apart := scored_apart(runs)) else []
    notes += [f"{run.label}: {k} of its {len(run.seeds)} seeds had not trained to their end when evaluated (their best "
              f"model so far): evaluate them again once they have" for run in runs
              if (k := sum(bool(m.get("unfinished")) for m in run.seeds))]
    notes += [f"{run.label}: not held-out, {max(m.get('seen_in_training', 0) for m in run.seeds)} of its "
              f"{run.split} images are among those it was trained on" for run in runs
              if any(m.get("seen_in_training") for m in run.seeds)]
    notes += [f"{run.label}: optimistic, {max(m.get('seen_in_validation', 0) for m in run.seeds)} of its "
              f"{run.split} images chose its best epoch (validation images)" for run in runs
              if any(m.get("seen_in_validation") for m in run.seeds)]
    if paper:
        if paper not in PAPER:
            raise FnemmError(f"--paper {paper}: the paper's numbers exist for {', '.join(PAPER)}")
        for run in runs:
            row = PAPER[paper].get(run.label)
            if row is None:
                continue
            a1, a5, a10, am, r1, r5, r10, rm = row
            lines.append(f"| paper {paper} {run.label} | | {a1} | {a5} | {a10} | {am} | – | {r1} | {r5} | {r10} | "
                         f"{rm} | – | {a1 + a5 + a10 + r1 + r5 + r10:.1f} |" + (" |" if baseline else ""))
    return "\n".join(lines) + "\n\n" + "".join(f"{note}.\n" for note in notes) + LEGEND


def verdict(runs: list[RunSummary], baseline: RunSummary | None) -> str:
    """One sentence: which model won, and whether the difference is within noise."""
    if baseline is None or len(runs) < 2:
        return ""
    best = max(runs, key=lambda r: r.mean_std("rsum")[0])
    others = [r for r in runs if r is not best]
    rival = baseline if best is not baseline else max(others, key=lambda r: r.mean_std("rsum")[0])
    if scored_apart([best, rival]):
        return (f"{best.label} and {rival.label} were scored on different test images: neither can be said to "
                f"be better.")
    c = compare(best, rival)
    if c is None:
        return f"{best.label} has the highest mean rsum ({best.mean_std('rsum')[0]:.1f})."
    noise = "beyond the test set's noise" if c.p < 0.05 else "within the test set's noise"
    return (f"{best.label} has the highest mean rsum, {c.mean:+.1f} over {rival.label} "
            f"[{c.low:+.1f}, {c.high:+.1f}], {format_p(c.p)}: {noise} ({c.method}).")


def pyplot():
    """matplotlib's pyplot, drawing to files (an extra: pip install 'fnemm[report]')."""
    try:
        import matplotlib
    except ImportError:
        raise FnemmError("plots need matplotlib, which is not installed: pip install 'fnemm[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(runs: list[RunSummary], path: str | Path) -> Path:
    """Validation rsum per epoch for every run (one line per seed)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for k, run in enumerate(runs):
        color = f"C{k % 10}"
        for s, curve in enumerate(run.curves):
            ax.plot(range(1, len(curve) + 1), curve, color=color, alpha=0.9 if s == 0 else 0.45,
                    label=run.label if s == 0 else None)
    chances = {run.val_chance for run in runs if run.val_chance is not None}
    for k, (mean, std) in enumerate(sorted(chances)):
        ax.axhspan(mean - 2 * std, mean + 2 * std, color="grey", alpha=0.25, lw=0,
                   label="chance ± 2 std" if k == 0 else None)
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
