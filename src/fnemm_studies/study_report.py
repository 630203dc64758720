"""study.md and study.png of ``fnemm study``: the table with intervals and p-values, a
few sentences that read it, and a plot of every variant's test rsum."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fnemm.io.files import atomic_path, atomic_write_text
from fnemm_studies.stats import Comparison, format_p, t_ppf

ALPHA = 0.05


def compared(entry: dict, other: str) -> Comparison | None:
    """A summary entry's comparison with ``other`` (None: not compared)."""
    c = entry.get(f"vs_{other}")
    return Comparison(**c) if c else None


def _cell(c: Comparison | None) -> str:
    if c is None:
        return "–"
    if c.n < 2:
        return f"{c.mean:+.1f}"
    mark = " *" if c.p < ALPHA else ""
    return f"{c.mean:+.1f} [{c.low:+.1f}, {c.high:+.1f}], {format_p(c.p)}{mark}"


def rsum_cell(entry: dict) -> str:
    """'281.4 ± 2.1 [270.3, 292.5]': mean test rsum, its spread over runs (when several) and
    its bootstrap interval (when the test images were resampled)."""
    text = f"{entry['rsum_mean']:.1f}"
    if entry["runs"] > 1:
        text += f" ± {entry['rsum_std']:.1f}"
    if "rsum_interval" in entry:
        low, high = entry["rsum_interval"]
        text += f" [{low:.1f}, {high:.1f}]"
    return text


def table(results: list[dict], cnn: str, size: int, about: dict[str, str]) -> str:
    lines = ["| variant | what | runs | test rsum | i2t R@1 | t2i R@1 | vs baseline | vs paper's FNE |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for e in results:
        if e["cnn"] != cnn or e["train_images"] != size:
            continue
        lines.append(f"| {e['variant']} | {about.get(e['variant'], '')} | {e['runs']} | "
                     f"{rsum_cell(e)} | {e['i2t_r1']:.1f} | {e['t2i_r1']:.1f} | "
                     f"{_cell(compared(e, 'baseline'))} | {_cell(compared(e, 'fne'))} |")
    return "\n".join(lines)


def recalls(results: list[dict], cnn: str, size: int, paper: dict | None = None) -> str:
    """Every recall, as the paper's tables give them (mean over the runs), with the paper's
    own rows (``paper``: {label: its 8 numbers}) below when given."""
    lines = ["| variant | runs | i2t R@1 | R@5 | R@10 | Med r | t2i R@1 | R@5 | R@10 | Med r | rsum |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in results:
        if e["cnn"] == cnn and e["train_images"] == size and "i2t_r5" in e:
            cells = [f"{e[k]:.1f}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr",
                                             "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr")]
            lines.append(f"| {e['variant']} | {e['runs']} | " + " | ".join(cells) + f" | {e['rsum_mean']:.1f} |")
    for label, row in (paper or {}).items():
        rsum = sum(row[k] for k in (0, 1, 2, 4, 5, 6))
        lines.append(f"| *{label}* | – | " + " | ".join(f"{v:g}" for v in row) + f" | {rsum:.1f} |")
    return "\n".join(lines)


def training(results: list[dict], cnn: str, size: int) -> str:
    """How the runs trained: epochs per seed (and per stage), those on the loss plateau, the
    best epoch, the median epoch's seconds and the training pairs it went through a second
    (one pair per training image an epoch; its validation included), hours."""
    lines = ["| variant | epochs (per run) | epochs per stage | on the loss plateau | best epoch | "
             "s per epoch (median) | pairs/s | hours (all runs) |",
             "|---|---|---|---|---|---|---|---:|"]
    for e in results:
        if e["cnn"] == cnn and e["train_images"] == size and "training" in e:
            t = e["training"]
            plateau = ", ".join("?" if p is None else str(p) for p in t.get("plateau_epochs") or [])
            secs = [s for s in t.get("median_epoch_s") or [] if s]
            lines.append(f"| {e['variant']} | {', '.join(map(str, t['epochs']))} | "
                         f"{'; '.join('+'.join(map(str, x)) for x in t['stage_epochs'])} | {plateau or '?'} | "
                         f"{', '.join(map(str, t['best_epoch']))} | {', '.join(f'{s:.0f}' for s in secs) or '?'} | "
                         f"{', '.join(f'{size / s:.0f}' for s in secs) or '?'} | {t['hours']:.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def unstarted(results: list[dict], cnn: str) -> str:
    """A warning naming the runs (any training size) whose last epoch was still on the loss
    plateau: they ended at their epoch limit before they may have started learning, so
    their rsum measures the limit, not the features or the training set."""
    cells = []
    for e in results:
        ended = (e.get("training") or {}).get("ended_on_plateau") or []
        if e["cnn"] == cnn and any(ended):
            cells.append(f"{e['variant']} at {e['train_images']} images ({sum(map(bool, ended))} of {len(ended)} runs)")
    if not cells:
        return ""
    return ("Ended still on the loss plateau, at their epoch limit (they may not have started learning; their "
            f"rsum measures the limit, not the features; more epochs would tell): {'; '.join(cells)}.")


def reading(results: list[dict], cnn: str, size: int) -> list[str]:
    """Sentences that say what the table shows for one CNN."""
    rows = [e for e in results if e["cnn"] == cnn and e["train_images"] == size]
    by = {e["variant"]: e for e in rows}
    if "baseline" not in by or "fne" not in by:
        return []
    out = []
    fne = compared(by["fne"], "baseline")
    if fne is not None and fne.n >= 2:
        verdict = ("beats" if fne.mean > 0 else "loses to") if fne.p < ALPHA else "is not distinguishable from"
        out.append(f"The paper's FNE {verdict} the baseline: {fne.format()} rsum ({fne.method}).")
    better = [e for e in rows if e["variant"] != "baseline" and (c := compared(e, "baseline")) and c.n >= 2
              and c.p < ALPHA and c.mean > 0]
    worse = [e for e in rows if e["variant"] != "baseline" and (c := compared(e, "baseline")) and c.n >= 2
             and c.p < ALPHA and c.mean < 0]
    tested = [e for e in rows if e["variant"] != "baseline" and (c := compared(e, "baseline")) and c.n >= 2]
    if tested:
        worse_text = f"{len(worse)} {'is' if len(worse) == 1 else 'are'} significantly worse"
        if better:
            names = ", ".join(f"{e['variant']} ({compared(e, 'baseline').mean:+.1f})" for e in better)
            out.append(f"{len(better)} of the {len(tested)} variants tested beat the baseline at "
                       f"p < {ALPHA}: {names}; {worse_text}.")
        else:
            out.append(f"None of the {len(tested)} variants tested beats the baseline at "
                       f"p < {ALPHA}; {worse_text}.")
    screened = [e["variant"] for e in rows if e["variant"] != "baseline" and e not in tested]
    if screened:
        out.append(f"Run once on one split (a screening: no test): {', '.join(screened)}.")
    best = max(tested, key=lambda e: e["rsum_mean"], default=None)
    if best is not None:
        c = compared(best, "fne")
        vs = f", {c.format()} vs the paper's FNE" if c is not None and c.n >= 2 else ""
        out.append(f"Best variant tested: {best['variant']} ({best['rsum_mean']:.1f} over "
                   f"{best['runs']} runs vs the baseline's {by['baseline']['rsum_mean']:.1f}{vs}).")
    return out


def _mean_cell(e: dict) -> str:
    """Mean ± std over the runs; one run has no spread to show."""
    if e["runs"] > 1:
        return f"{e['rsum_mean']:.1f} ± {e['rsum_std']:.1f}"
    return f"{e['rsum_mean']:.1f} (1 run)"


def curve(results: list[dict], cnn: str) -> str:
    """The learning curve as a table: rsum per training size for the curve's variants."""
    sizes = sorted({e["train_images"] for e in results if e["cnn"] == cnn})
    if len(sizes) < 2:
        return ""
    # the curve's variants: those run below the full size (the full size runs every variant)
    names = sorted({e["variant"] for e in results if e["cnn"] == cnn and e["train_images"] < sizes[-1]})
    lines = ["| training images | " + " | ".join(names) + " | FNE - baseline |",
             "|---:|" + "---:|" * (len(names) + 1)]
    for size in sizes:
        by = {e["variant"]: e for e in results if e["cnn"] == cnn and e["train_images"] == size}
        cells = [_mean_cell(by[n]) if n in by else "–" for n in names]
        diff = compared(by["fne"], "baseline") if "fne" in by else None
        lines.append(f"| {size} | " + " | ".join(cells) + f" | {_cell(diff)} |")
    return "\n".join(lines)


def trend_lines(trends: list[dict], cnn: str) -> list[str]:
    """A sentence per variant: how its gap to the baseline moves per doubling of the
    training images, where the curves cross (if they do), and (a rough, linear-in-log
    extrapolation) where a closing gap would close."""
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
        cross = t.get("crossings") or []
        if cross:
            line += "; the curves cross near " + " and ".join(f"{x:,.0f}" for x in cross) + " training images"
        elif c.n >= 2 and last < 0 < c.mean and c.p < ALPHA:
            line += (f"; at that rate the gap would close near {sizes[-1] * 2 ** (-last / c.mean):,.0f} training "
                     f"images (a linear extrapolation in log size: a rough indication only)")
        else:
            line += "; the curves do not cross between these sizes"
        out.append(line + ".")
    return out


def plot(results: list[dict], cnns: tuple[str, ...], full: int, path: Path) -> Path:
    from fnemm_studies.report import pyplot
    plt = pyplot()
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


def time_line(results: list[dict]) -> str | None:
    """How long the finished runs trained, all together (None before any has)."""
    trained = [t for e in results if "hours" in (t := e.get("training", {})) and "epochs" in t]
    if not trained:
        return None
    return (f"Time: {sum(len(t['epochs']) for t in trained)} finished runs took {sum(t['hours'] for t in trained):.1f} "
            f"hours of training (every epoch with its validation; feature extraction and testing not included).")


def code_line(results: list[dict]) -> str | None:
    """Which code trained the finished runs, as their records say (None when none says:
    runs made before run.json recorded it)."""
    counts: dict[str, int] = {}
    unknown = 0
    for e in results:
        for code in e.get("training", {}).get("code") or []:
            if code:
                key = " then ".join(code)
                counts[key] = counts.get(key, 0) + 1
            else:
                unknown += 1
    if not counts:
        return None
    said = [f"{n} run{'s' * (n != 1)} at {key}" for key, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    if unknown:
        said.append(f"{unknown} made before runs recorded it")
    return f"Code: {'; '.join(said)} (run.json's \"software\": commit, and each resumption's)."


def progress_line(summary: dict) -> str:
    """How far the grid is, from the summary's counts ("" for a summary without them)."""
    if not (p := summary.get("progress")):
        return ""
    (done_full, full), (done_curve, curve) = p["full"], p["curve"]
    line = f"Finished: {done_full + done_curve} of the grid's {full + curve} runs"
    if curve:
        line += (f" ({summary['full_train_images']:,} training images: {done_full} of {full}; "
                 f"the learning curve: {done_curve} of {curve})")
    return line + "."


def method(grid, summary: dict) -> str:
    """How the comparisons were made, as the summary's comparisons say."""
    used = {e[k]["method"].split(" over ")[0] for e in summary["results"] for k in ("vs_baseline", "vs_fne") if k in e}
    t_test = ("a paired t-test over splits (each split's difference averaged over its seeds, since they share its "
              "test images)")
    boot = ("a paired bootstrap over the test images (the same resample for both models in every draw; each model's "
            "seeds resampled too; rsum intervals: bootstrap over the test images and seeds)")
    how = " and, for rows run on one split, ".join(
        [t for t, on in ((t_test, grid.splits > 1), (boot, "paired bootstrap" in used or grid.splits == 1)) if on])
    return f"mean difference in test rsum, its 95% interval and two-sided p-value, from {how}"


def write_report(out: Path, summary: dict, grid, dataset, about: dict[str, str], pipelines: tuple[str, str]) -> Path:
    """study.md (and study.png) in ``out``: ``about`` says what each variant is,
    ``pipelines`` the presets the variants and the baseline trained."""
    from fnemm_studies.report import PAPER
    results, full = summary["results"], summary["full_train_images"]
    fne, base = pipelines
    stop = (f", every stage stopped after {grid.patience} epoch{'s' * (grid.patience != 1)} without a better "
            f"validation rsum" if grid.patience else "")
    parts = ["# When does the Full-Network Embedding pay off? (fnemm study)\n",
             f"{dataset.summary()}; {grid.splits} split(s) (split 0: the dataset's own"
             + ("; the others drawn at random with the same sizes" if grid.splits > 1 else "")
             + f") x {grid.seeds} seed(s); every variant trains the {fne} pipeline (the baseline {base}){stop}. "
             f"Each is compared with the baseline and with the paper's FNE on the same splits and seeds: "
             f"{method(grid, summary)}. * marks p < {ALPHA}."]
    if done := progress_line(summary):
        parts.append(f"\n{done}")
    paper = PAPER.get(grid.presets, {})
    paper_rows = {f"paper {k} (VGG16)": paper[k] for k in ("FC7-MH", "FNE-MH") if k in paper}
    for cnn in grid.cnns:
        if not any(e["cnn"] == cnn for e in results):
            continue
        parts.append(f"\n## {cnn}\n\n{table(results, cnn, full, about)}\n")
        parts += [f"- {s}" for s in reading(results, cnn, full)]
        parts.append(f"\nRecalls ({full} training images):\n\n{recalls(results, cnn, full, paper_rows)}\n")
        if t := training(results, cnn, full):
            from fnemm.joint.losses import PLATEAU_SHARE
            parts.append(f"How the runs trained (on the loss plateau: epochs whose mean loss was at least "
                         f"{PLATEAU_SHARE:.0%} of that of equal scores, which patience does not count):\n\n{t}\n")
        if w := unstarted(results, cnn):
            parts.append(f"**{w}**\n")
        if c := curve(results, cnn):
            parts.append(f"\n### Learning curve\n\n{c}\n")
            parts += [f"- {line}" for line in trend_lines(summary.get("trends", []), cnn)]
    if took := time_line(results):
        parts.append(f"\n{took}\n")
    if code := code_line(results):
        parts.append(f"{code}\n")
    if results:
        png = plot(results, grid.cnns, full, out / "study.png")
        parts.append(f"\n![test rsum per variant]({png.name})\n")
    path = out / "study.md"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path
