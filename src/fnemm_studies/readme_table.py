"""The README's tables of a study's full-size results, drawn from its exported
``study.json``, so that the numbers a reader sees are the committed records' and cannot
drift from them as runs finish (tests/test_study.py checks the README against them).

    python -m fnemm_studies.readme_table results/flickr8k-224 README.md           # rewrite the block
    python -m fnemm_studies.readme_table results/flickr8k-224 README.md --check   # exit 1 if stale

The block sits between two marker lines naming the folder; everything else in the
file is left as it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fnemm.io.errors import FnemmError
from fnemm.io.files import atomic_write_text, read_json
from fnemm_studies.study_report import (ALPHA, code_line, compared, curve, progress_line, rsum_cell, time_line,
                                        trend_lines)

NAMES = {"efficientnet_lite0": "EfficientNet-Lite0", "mobilenet_v2": "MobileNetV2", "vgg16": "VGG16"}
PIPELINES = {"baseline": "FC7-MH", "fne": "FNE-MH"}        # the paper's names of the study's pair


def markers(folder: str) -> tuple[str, str]:
    return (f"<!-- tables drawn from {folder}/study.json by `python -m fnemm_studies.readme_table {folder} "
            f"README.md`; do not edit by hand -->", f"<!-- end of the tables drawn from {folder}/study.json -->")


def _diff(entry: dict, other: str) -> str:
    if entry["variant"] == other:
        return "–"
    if (c := compared(entry, other)) is None:
        return ""
    return f"**{c.format()}**" if c.n >= 2 and c.p < ALPHA else c.format()


def _epochs(entry: dict) -> str:
    t = entry.get("training")
    if not t:
        return ""
    return ", ".join(f"{' + '.join(map(str, stages))} ({best})" for stages, best in zip(t["stage_epochs"], t["best_epoch"]))


def tables(summary: dict, about: dict[str, str]) -> str:
    """How far the grid is and how long its finished runs trained; per CNN, the full-size
    variants: test rsum (mean ± std over runs, bootstrap interval), every recall, the epochs
    each run took (its best), the differences against the baseline and the paper's FNE
    (bold: p < 0.05), then the paper's VGG16 FC7-MH and FNE-MH rows; then each CNN's
    learning curve (study.md's table and trend sentences), if it has one."""
    from fnemm_studies.report import PAPER
    grid, full = summary["grid"], summary["full_train_images"]
    paper = PAPER.get(grid.get("presets") or "", {})
    blocks = [line for line in (progress_line(summary), time_line(summary["results"]), code_line(summary["results"]))
              if line]
    for cnn in grid["cnns"]:
        rows = [e for e in summary["results"] if e["cnn"] == cnn and e["train_images"] == full]
        if not rows:
            continue
        lines = [f"| {NAMES.get(cnn, cnn)}, {full:,} training images | runs | test rsum: mean ± std [95%] | "
                 f"i2t R@1 / 5 / 10 | t2i R@1 / 5 / 10 | epochs (best) | vs baseline | vs the paper's FNE |",
                 "|---|---:|---|---|---|---|---|---|"]
        for e in rows:
            name = f"`{e['variant']}`" + (f" ({PIPELINES[e['variant']]})" if e["variant"] in PIPELINES else "")
            recalls = [" / ".join(f"{e[f'{d}_r{k}']:.1f}" for k in (1, 5, 10)) for d in ("i2t", "t2i")]
            if what := about.get(e["variant"]):
                name += f": {what}"
            lines.append(f"| {name} | {e['runs']} | {rsum_cell(e)} | {recalls[0]} | "
                         f"{recalls[1]} | {_epochs(e)} | {_diff(e, 'baseline')} | {_diff(e, 'fne')} |")
        rsums = {k: sum(paper[k][i] for i in (0, 1, 2, 4, 5, 6)) for k in ("FC7-MH", "FNE-MH") if k in paper}
        for k, rsum in rsums.items():
            row = paper[k]
            gap = f"{rsum - rsums['FC7-MH']:+.1f}" if k != "FC7-MH" and "FC7-MH" in rsums else ""
            cells = [f"*paper, VGG16 {k}*", "", f"{rsum:.1f}", " / ".join(f"{v:.1f}" for v in row[0:3]),
                     " / ".join(f"{v:.1f}" for v in row[4:7]), "", gap, ""]
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    for cnn in grid["cnns"]:
        if c := curve(summary["results"], cnn):
            said = [f"- {line}" for line in trend_lines(summary.get("trends", []), cnn)]
            blocks.append("\n".join([f"Learning curve, {NAMES.get(cnn, cnn)} (test rsum by training images):", "", c,
                                      *([""] + said if said else [])]))
    return "\n\n".join(blocks)


def render(text: str, folder: str, block: str, source: Path) -> str:
    """``text`` with the block between ``folder``'s markers replaced by ``block``."""
    begin, end = markers(folder)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise FnemmError(f"{source}: expected one pair of marker lines around the tables, in order:\n{begin}\n{end}")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{block}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fnemm_studies.readme_table", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="an exported study folder (its study.json), as the README names it")
    p.add_argument("readme", type=Path, help="the file holding the marked block")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if the block is not up to date")
    args = p.parse_args(argv)
    from fnemm_studies.study import BY_NAME
    try:
        summary = read_json(Path(args.folder) / "study.json", "export the study first (`fnemm study ... "
                            "--report-only --export FOLDER`)")
        try:
            text = args.readme.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FnemmError(f"{args.readme}: cannot read it ({type(e).__name__}); name the README that holds "
                             f"the marked tables") from None
        new = render(text, args.folder, tables(summary, {n: v.about for n, v in BY_NAME.items()}), args.readme)
    except FnemmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if new == text:
        return 0
    if args.check:
        print(f"{args.readme}: the tables of {args.folder}/study.json are out of date; run "
              f"`python -m fnemm_studies.readme_table {args.folder} {args.readme}`", file=sys.stderr)
        return 1
    atomic_write_text(args.readme, new)
    print(f"{args.readme}: tables redrawn from {args.folder}/study.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
