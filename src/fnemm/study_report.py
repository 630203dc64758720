"""study.md and study.png of ``fnemm study``: the table with intervals and p-values, a
few sentences that read it, and a plot of every variant's test rsum."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fnemm.fileio import atomic_path, atomic_write_text
from fnemm.stats import Comparison, format_p, t_ppf

ALPHA = 0.05


def _cmp(entry: dict, other: str) -> Comparison | None:
    c = entry.get(f"vs_{other}")
    return Comparison(**c) if c else None


def _cell(c: Comparison | None) -> str:
    if c is None:
        return "–"
    if c.n < 2:
        return f"{c.mean:+.1f}"
    mark = " *" if c.p < ALPHA else ""
    return f"{c.mean:+.1f} [{c.low:+.1f}, {c.high:+.1f}], {format_p(c.p)}{mark}"


def table(results: list[dict], cnn: str, size: int, about: dict[str, str]) -> str:
    lines = ["| variant | what | runs | test rsum | i2t R@1 | t2i R@1 | vs baseline | vs paper's FNE |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for e in results:
        if e["cnn"] != cnn or e["train_images"] != size:
            continue
        spread = f" ± {e['rsum_std']:.1f}" if e["runs"] > 1 else ""
        lines.append(f"| {e['variant']} | {about.get(e['variant'], '')} | {e['runs']} | "
                     f"{e['rsum_mean']:.1f}{spread} | {e['i2t_r1']:.1f} | {e['t2i_r1']:.1f} | "
                     f"{_cell(_cmp(e, 'baseline'))} | {_cell(_cmp(e, 'fne'))} |")
    return "\n".join(lines)


def reading(results: list[dict], cnn: str, size: int) -> list[str]:
    """Sentences that say what the table shows for one CNN."""
    rows = [e for e in results if e["cnn"] == cnn and e["train_images"] == size]
    by = {e["variant"]: e for e in rows}
    if "baseline" not in by or "fne" not in by:
        return []
    out = []
    fne = _cmp(by["fne"], "baseline")
    if fne is not None and fne.n >= 2:
        verdict = ("beats" if fne.mean > 0 else "loses to") if fne.p < ALPHA else "is not distinguishable from"
        out.append(f"The paper's FNE {verdict} the baseline: {fne.format()} rsum ({fne.method}).")
    better = [e for e in rows if e["variant"] != "baseline" and (c := _cmp(e, "baseline")) and c.n >= 2
              and c.p < ALPHA and c.mean > 0]
    worse = [e for e in rows if e["variant"] != "baseline" and (c := _cmp(e, "baseline")) and c.n >= 2
             and c.p < ALPHA and c.mean < 0]
    tested = [e for e in rows if e["variant"] != "baseline" and (c := _cmp(e, "baseline")) and c.n >= 2]
    if tested:
        worse_text = f"{len(worse)} {'is' if len(worse) == 1 else 'are'} significantly worse"
        if better:
            names = ", ".join(f"{e['variant']} ({_cmp(e, 'baseline').mean:+.1f})" for e in better)
            out.append(f"{len(better)} of the {len(tested)} variants tested on several splits beat the baseline at "
                       f"p < {ALPHA}: {names}; {worse_text}.")
        else:
            out.append(f"None of the {len(tested)} variants tested on several splits beats the baseline at "
                       f"p < {ALPHA}; {worse_text}.")
    screened = [e["variant"] for e in rows if e["variant"] != "baseline" and e["splits"] < 2]
    if screened:
        out.append(f"Run on one split only (a screening: no test): {', '.join(screened)}.")
    best = max((e for e in rows if e["variant"] != "baseline" and e["splits"] >= 2), key=lambda e: e["rsum_mean"],
               default=None)
    if best is not None:
        c = _cmp(best, "fne")
        vs = f", {c.format()} vs the paper's FNE" if c is not None and c.n >= 2 else ""
        out.append(f"Best variant tested on several splits: {best['variant']} ({best['rsum_mean']:.1f} over "
                   f"{best['runs']} runs vs the baseline's {by['baseline']['rsum_mean']:.1f}{vs}).")
    return out


def curve(results: list[dict], cnn: str) -> str:
    """The learning curve as a table: rsum per training size for the curve's variants."""
    sizes = sorted({e["train_images"] for e in results if e["cnn"] == cnn})
    if len(sizes) < 2:
        return ""
    names = sorted({e["variant"] for e in results if e["cnn"] == cnn and e["train_images"] == sizes[0]})
    lines = ["| training images | " + " | ".join(names) + " | FNE - baseline |",
             "|---:|" + "---:|" * (len(names) + 1)]
    for size in sizes:
        by = {e["variant"]: e for e in results if e["cnn"] == cnn and e["train_images"] == size}
        cells = [f"{by[n]['rsum_mean']:.1f} ± {by[n]['rsum_std']:.1f}" if n in by else "–" for n in names]
        diff = _cmp(by["fne"], "baseline") if "fne" in by else None
        lines.append(f"| {size} | " + " | ".join(cells) + f" | {_cell(diff)} |")
    return "\n".join(lines)


def trend_lines(trends: list[dict], cnn: str) -> list[str]:
    """A sentence per variant: how its gap to the baseline moves per doubling of the
    training images, and (a rough, linear-in-log extrapolation) where it would close."""
    out = []
    for t in trends:
        if t["cnn"] != cnn:
            continue
        c = Comparison(**t["per_doubling"])
        sizes = sorted(int(k) for k in t["gap"])
        last = t["gap"][str(sizes[-1])]
        path = " -> ".join(f"{t['gap'][str(n)]:+.1f}" for n in sizes)
        line = (f"{t['variant']} - baseline: {path} rsum at "
                f"{', '.join(map(str, sizes))} training images; {c.format()} per doubling ({c.method})")
        if c.n >= 2 and last < 0 < c.mean and c.p < ALPHA:
            line += (f"; at that rate the gap would close near {sizes[-1] * 2 ** (-last / c.mean):,.0f} training "
                     f"images (a linear extrapolation in log size: a rough indication only)")
        out.append(line + ".")
    return out


def plot(results: list[dict], cnns: tuple[str, ...], full: int, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cnns = [c for c in cnns if any(e["cnn"] == c and e["train_images"] == full for e in results)]
    fig, axes = plt.subplots(1, max(len(cnns), 1), figsize=(6.5 * max(len(cnns), 1), 6), dpi=100, squeeze=False)
    for ax, cnn in zip(axes[0], cnns):
        rows = [e for e in results if e["cnn"] == cnn and e["train_images"] == full]
        rows.sort(key=lambda e: e["rsum_mean"])
        y = np.arange(len(rows))
        half = [t_ppf(0.975, e["runs"] - 1) * e["rsum_std"] / np.sqrt(e["runs"]) if e["runs"] > 1 else 0
                for e in rows]
        colours = ["black" if e["variant"] == "baseline" else "C3" if e["variant"] == "fne" else "C0" for e in rows]
        for k, e in enumerate(rows):
            ax.errorbar(e["rsum_mean"], y[k], xerr=half[k], fmt="o", color=colours[k], capsize=3)
        base = next((e["rsum_mean"] for e in rows if e["variant"] == "baseline"), None)
        if base is not None:
            ax.axvline(base, color="black", lw=0.8, ls="--")
        ax.set_yticks(y, [e["variant"] for e in rows])
        ax.set_xlabel("test rsum (mean over runs, 95% interval)")
        ax.set_title(f"{cnn}, {full} training images")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_report(out: Path, summary: dict, grid, dataset) -> Path:
    from fnemm.study import BY_NAME
    about = {name: v.about for name, v in BY_NAME.items()}
    results, full = summary["results"], summary["full_train_images"]
    parts = ["# When does the Full-Network Embedding pay off? (fnemm study)\n",
             f"{dataset.summary()}; {grid.splits} split(s) (split 0: the dataset's own; the others drawn at "
             f"random with the same sizes) x {grid.seeds} seed(s); every variant trains the demo/FNE-MH "
             f"pipeline (the baseline demo/FC7-MH) and is compared with the baseline and with the paper's FNE "
             f"on the same splits and seeds: mean difference in test rsum, its 95% interval and two-sided "
             f"p-value, from a paired t-test over splits (each split's difference averaged over its seeds, "
             f"since they share its test images). * marks p < {ALPHA}."]
    for cnn in grid.cnns:
        if not any(e["cnn"] == cnn for e in results):
            continue
        parts.append(f"\n## {cnn}\n\n{table(results, cnn, full, about)}\n")
        parts += [f"- {s}" for s in reading(results, cnn, full)]
        if c := curve(results, cnn):
            parts.append(f"\n### Learning curve\n\n{c}\n")
            parts += [f"- {line}" for line in trend_lines(summary.get("trends", []), cnn)]
    if results:
        png = plot(results, grid.cnns, full, out / "study.png")
        parts.append(f"\n![test rsum per variant]({png.name})\n")
    path = out / "study.md"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path
