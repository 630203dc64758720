"""``fnemm study``: when does the Full-Network Embedding pay off?

A grid of image-feature variants (layers x post-processing x training-side
regularisation, see ``VARIANTS``) x CNNs x re-splits of a dataset x seeds, each an
ordinary resumable run folder, then paired comparisons of every variant against the
baseline ("FC7": the CNN's last conv pooled, L2) and against the paper's FNE, on
the same split and seed. Re-split 0 is the dataset's own split; the others draw
train/val/test at random with the same sizes, so a difference must hold beyond one
choice of test images. Optionally a learning curve: fewer training images.

    OUT/study.json          the grid (a re-run resumes it) and, at the end, every result
    OUT/splits/*.jsonl      each re-split (and training-size cut) as a dataset file
    OUT/features/CNN/base   the forward pass (raw.npy), once per CNN
    OUT/features/CNN/S/R    per split S and recipe R: statistics and features from base
    OUT/runs/CNN/nN/VARIANT/split-K/seed-S   the runs (train + test metrics)
    OUT/study.md, study.png the table with intervals and p-values, and a plot

Several ``fnemm study`` processes on one OUT share the work: each run and each store
is locked while one of them writes it (``fnemm.io.locks``).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fnemm.joint.config import TrainConfig, apply_overrides, differences

from fnemm.joint.presets import get_preset
from fnemm.datasets import Dataset
from fnemm.io.errors import FnemmError
from fnemm.features.assembly import derive_store
from fnemm.features.extraction import ExtractConfig, extract
from fnemm.features.store import load_features
from fnemm.io.files import atomic_write_json, make_folder, read_json
from fnemm.io.locks import Busy, folder_lock
from fnemm.features.recipe import Recipe
from fnemm.training.folders import (epoch_history, load_metrics, load_ranks, metrics_path, ranks_path, save_metrics,
                                    save_ranks, training_summary)
from fnemm_studies.study_summary import summarise


@dataclass(frozen=True)
class Variant:
    name: str
    recipe: Recipe | None                 # None: the baseline layer (the store's fc7 array)
    overrides: tuple[str, ...] = ()       # training-side changes (--set)
    about: str = ""


VARIANTS = (
    Variant("baseline", None, about="the last conv layer pooled, L2 (the paper's FC7 baseline)"),
    Variant("fne", Recipe(), about="the paper: every layer but the classifier, z-score, {-1,0,1}"),
    Variant("fne-all", Recipe(layers="all"), about="the paper's FNE plus the classifier's scores"),
    Variant("fne-baseline-layer", Recipe(layers="baseline"), about="the baseline's layer alone, z-score, {-1,0,1}"),
    Variant("fne-late", Recipe(layers="late"), about="the last quarter of the layers"),
    Variant("fne-blocks", Recipe(layers="blocks"), about="block outputs only (stem, projections, last conv)"),
    Variant("fne-wide-thresholds", Recipe(thresholds=(-0.5, 0.5)), about="thresholds -0.5/0.5 (more zeros)"),
    Variant("zscore", Recipe(post="zscore"), about="continuous z-scores clipped to +-3"),
    Variant("zscore-layer-l2", Recipe(post="zscore-layer-l2"), about="z-scores, each layer L2-normalised"),
    Variant("layer-l2", Recipe(post="layer-l2"), about="raw activations, each layer L2-normalised"),
    Variant("center", Recipe(post="center"), about="centred only: raw relative magnitudes kept (a global rescaling)"),
    Variant("center-layer", Recipe(post="center-layer"), about="centred, each layer over its RMS std"),
    Variant("fne+baseline", Recipe(baseline=True), about="the paper's FNE with the L2 baseline appended"),
    Variant("fne-pca256", Recipe(pca=256), about="the paper's FNE projected on 256 principal components"),
    Variant("fne-weight-decay", Recipe(), ("image_weight_decay=1.0",), about="image map with AdamW decay 1.0"),
    Variant("fne-dropout", Recipe(), ("model.image_dropout=0.5",), about="input dropout 0.5 on the codes"),
    Variant("late-center-layer", Recipe(layers="late", post="center-layer"), about="late layers, centred per layer"),
)
BY_NAME = {v.name: v for v in VARIANTS}
# The pipeline every variant trains: FAMILY/FNE-MH, the baseline FAMILY/FC7-MH (Grid.presets)
PRESET_FAMILIES = ("demo", "flickr8k", "flickr30k", "coco")


def preset_of(family: str, baseline: bool) -> str:
    return f"{family}/{'FC7' if baseline else 'FNE'}-MH"


@dataclass(frozen=True)
class Grid:
    cnns: tuple[str, ...] = ("mobilenet_v2", "efficientnet_lite0")
    variants: tuple[str, ...] = tuple(v.name for v in VARIANTS)
    splits: int = 5
    seeds: int = 3
    train_sizes: tuple[int, ...] = ()               # learning curve: fewer training images
    curve_variants: tuple[str, ...] = ("baseline", "fne")
    epochs: int | None = None                       # cap on every stage's max epochs
    crops: int = 10
    max_images: int | None = None                   # a smaller dataset (quick runs)
    presets: str = "demo"                           # FAMILY: FAMILY/FNE-MH and FAMILY/FC7-MH
    patience: int | None = None                     # end every stage after N epochs without a better rsum
    curve_cnns: tuple[str, ...] = ()                # CNNs of the learning curve (empty: all)
    curve_seeds: int | None = None                  # seeds of the curve's smaller sizes (None: seeds)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__})


QUICK = Grid(cnns=("mobilenet_v2",), variants=("baseline", "fne", "fne-late"), splits=2, seeds=1,
             epochs=8, crops=1, max_images=300)


def _fixed(grid: Grid) -> Grid:
    """What every run of a study shares (a re-run may add CNNs, variants, splits, seeds
    or curve points, but not change how a run trains)."""
    return replace(grid, variants=(), cnns=(), train_sizes=(), curve_variants=(), seeds=1, splits=1,
                   curve_cnns=(), curve_seeds=None)


def variants(names) -> tuple[Variant, ...]:
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise FnemmError(f"--variants {unknown[0]}: unknown; choose from {', '.join(BY_NAME)}")
    if "baseline" not in names or "fne" not in names:
        raise FnemmError("--variants must include baseline and fne (every variant is compared with them)")
    return tuple(BY_NAME[n] for n in names)


def _slug(recipe: Recipe) -> str:
    text = f"{recipe.layers}-{recipe.post}"
    if recipe.post == "fne" and recipe.thresholds != Recipe().thresholds:
        text += f"-{recipe.thresholds[0]:g}_{recipe.thresholds[1]:g}"
    if recipe.post == "zscore":
        text += f"-clip{recipe.clip:g}"
    text += f"-pca{recipe.pca}" if recipe.pca else ""
    text += "+baseline" if recipe.baseline else ""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


@dataclass
class Unit:
    """One run of the grid."""
    cnn: str
    variant: Variant
    split: int
    size: int                 # training images
    seed: int
    data: Path = field(repr=False)        # its dataset file
    run: Path = field(repr=False)


class Study:
    def __init__(self, dataset: Dataset, images: Path, out: Path, grid: Grid, device: str = "cpu",
                 workers: int = 1, quiet: bool = False):
        self.out, self.grid, self.device, self.workers, self.quiet = Path(out), grid, device, workers, quiet
        self.images = Path(images)
        self.dataset = dataset.head(grid.max_images) if grid.max_images else dataset
        self.variants = variants(grid.variants)
        if grid.splits < 1 or grid.seeds < 1 or (grid.curve_seeds is not None and grid.curve_seeds < 1):
            raise FnemmError("--splits, --seeds and --curve-seeds must be >= 1")
        if grid.presets not in PRESET_FAMILIES:
            raise FnemmError(f"--presets {grid.presets}: expected one of {', '.join(PRESET_FAMILIES)}")
        if grid.patience is not None and grid.patience < 1:
            raise FnemmError(f"--patience {grid.patience}: expected at least 1 epoch")
        self._check_names(grid)
        self.full = len(self.dataset.split_indices("train"))
        bad = [n for n in grid.train_sizes if not 0 < n < self.full]
        if bad:
            raise FnemmError(f"--train-sizes {bad[0]}: expected fewer than the {self.full} training images")

    def _check_names(self, grid: Grid) -> None:
        """Before anything is written: CNNs and curve variants that exist (a typo in a curve
        name used to leave the curve without it, silently); a curve CNN or variant the grid
        does not train (a worker given part of a grid) is said, not refused."""
        from fnemm.features.cnn import cnn_names
        known = cnn_names()
        for flag, names in (("--cnns", grid.cnns), ("--curve-cnns", grid.curve_cnns)):
            for cnn in names:
                if cnn not in known and ":" not in cnn:
                    raise FnemmError(f"{flag} {cnn}: unknown CNN; choose from {', '.join(known)} "
                                     f"(or package.module:function)")
        for name in grid.curve_variants:
            if name not in BY_NAME:
                raise FnemmError(f"--curve-variants {name}: unknown; choose from {', '.join(BY_NAME)}")
        if grid.train_sizes:
            for flag, asked, have in (("--curve-variants", grid.curve_variants, grid.variants),
                                      ("--curve-cnns", grid.curve_cnns, grid.cnns)):
                if missing := [n for n in asked if n not in have]:
                    self.log(f"   learning curve: {', '.join(missing)} not in {flag.replace('curve-', '')}: "
                             f"this grid trains no curve run of {'it' if len(missing) == 1 else 'them'}")

    def log(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    # --- the grid --------------------------------------------------------------
    def units(self) -> list[Unit]:
        """Every run, in the order that makes the comparisons usable soonest: seed by seed;
        within a seed the full training set first, then the learning curve's sizes (largest
        first); within those, split by split (the paired tests over splits need every split
        of one seed before a second seed helps them)."""
        g, units = self.grid, []
        sizes = [self.full] + sorted(g.train_sizes, reverse=True)
        curve_seeds = g.seeds if g.curve_seeds is None else g.curve_seeds
        for seed in range(max(g.seeds, curve_seeds)):
            for size in sizes:
                full = size == self.full
                if seed >= (g.seeds if full else curve_seeds):
                    continue
                chosen = self.variants if full else [v for v in self.variants if v.name in g.curve_variants]
                cnns = g.cnns if full or not g.curve_cnns else [c for c in g.cnns if c in g.curve_cnns]
                for split in range(g.splits):
                    data = self.out / "splits" / (f"split-{split}.jsonl" if full
                                                  else f"split-{split}-train{size}.jsonl")
                    for cnn in cnns:
                        for v in chosen:
                            run = self.out / "runs" / cnn / f"n{size}" / v.name / f"split-{split}" / f"seed-{seed}"
                            units.append(Unit(cnn, v, split, size, seed, data, run))
        return units

    def split_data(self, split: int, size: int) -> Dataset:
        data = self.dataset.resplit(split)
        return data.with_train_size(size, seed=split) if size < self.full else data

    def _write_splits(self) -> None:
        for size in [self.full, *self.grid.train_sizes]:
            for split in range(self.grid.splits):
                path = self.out / "splits" / (f"split-{split}.jsonl" if size == self.full
                                              else f"split-{split}-train{size}.jsonl")
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self.split_data(split, size).to_jsonl(path)

    def base_store(self, cnn: str, wait: bool = True) -> Path:
        """The forward pass of every image through ``cnn``, once (statistics of split 0);
        without ``wait``, :class:`Busy` when another worker is extracting it."""
        base = self.out / "features" / cnn / "base"
        with folder_lock(base, "a feature store", wait=wait):
            if not (base / "manifest.json").exists():
                self.log(f"== extract {cnn} ({self.grid.crops} crops) -> {base}")
            extract(self.images, base, self.dataset, ExtractConfig(cnn=cnn, crops=self.grid.crops,
                                                                   workers=self.workers, device=self.device),
                    quiet=self.quiet)     # its progress lines: the longest silent stage otherwise
        return base

    def base_stores(self) -> None:
        """Every CNN's store: first each one no other worker is extracting, then (waiting)
        the rest, so that workers started together on a new machine extract the CNNs side
        by side instead of one extracting while the others wait for it."""
        busy = []
        for cnn in self.grid.cnns:
            try:
                self.base_store(cnn, wait=False)
            except Busy:
                self.log(f"   {cnn}: another worker is extracting it; the next CNN meanwhile")
                busy.append(cnn)
        for cnn in busy:
            self.base_store(cnn)

    def store(self, unit: Unit, recipe: Recipe) -> Path:
        """The unit's features: ``recipe`` with the statistics of its training images."""
        data = self.split_data(unit.split, unit.size)
        folder = self.out / "features" / unit.cnn / f"split-{unit.split}-n{unit.size}" / _slug(recipe)
        train = {data.image_ids[k] for k in data.split_indices("train")}
        with folder_lock(folder, "a feature store", wait=True):
            derive_store(self.out / "features" / unit.cnn / "base", folder, train, recipe)
        return folder

    def config(self, unit: Unit):
        preset = preset_of(self.grid.presets, unit.variant.recipe is None)
        overrides = [*unit.variant.overrides, f"seed={unit.seed}"]
        if self.grid.epochs:
            overrides.append(f"stages.max_epochs={self.grid.epochs}")
        if self.grid.patience:
            overrides.append(f"stages.patience={self.grid.patience}")
        return preset, apply_overrides(get_preset(preset), overrides), overrides

    def check_config(self, unit: Unit) -> None:
        """A finished run counts only if it was trained with the config the grid gives it
        now: records carried from another machine, or a grid resumed with another fnemm
        whose presets changed, must not fill a table row they were not trained for. (A
        started run is checked by the trainer when it resumes.) Compared as configs, not
        dicts: a field added since takes its default, which is what the run trained with."""
        path = unit.run / "config.json"
        saved, want = self.trained_with(unit.run), self.config(unit)[1]
        if saved != want:
            raise FnemmError(f"{path}: this finished run was trained with another config than the grid gives it "
                             f"({differences(saved, want)}); finish the study with the fnemm it was started "
                             f"with, or choose another --out")

    @staticmethod
    def trained_with(run: Path):
        """The config a run's records say it was trained with (None where config.json holds
        no config this fnemm can read; a missing or unreadable file is a one-line error)."""
        data = read_json(run / "config.json", "copy the run's records again, or delete its folder to train it again")
        try:
            return TrainConfig.from_dict(data)
        except (TypeError, ValueError, AttributeError):
            return None

    def run_one(self, unit: Unit) -> dict | None:
        """Train and test one unit (resuming it), unless done or another worker has it."""
        from fnemm.datasets import load_dataset
        from fnemm.eval.protocols import evaluate
        from fnemm.training.trainer import train
        target = metrics_path(unit.run, "test")
        if target.exists():
            self.check_config(unit)
            return load_metrics(unit.run, "test")
        try:
            with folder_lock(unit.run, "a study run"):
                if target.exists():
                    self.check_config(unit)
                    return load_metrics(unit.run, "test")
                store = self.store(unit, unit.variant.recipe or Recipe())
                preset, config, overrides = self.config(unit)
                dataset = load_dataset(unit.data)
                features = load_features(store, config.features)
                t = time.perf_counter()
                train(config, dataset, features, unit.run, resume=(unit.run / "last.pt").exists(),
                      device=self.device, quiet=self.quiet,
                      run_info={"preset": preset, "overrides": overrides, "study": unit.variant.name,
                                "args": {"dataset": [str(unit.data)], "features": str(store)}})
                ranks: dict = {}
                results = evaluate(unit.run, dataset, features, "test", device=self.device, ranks=ranks)
                save_ranks(ranks_path(unit.run, "test"), ranks)     # before the metrics: they mark it done
                save_metrics(target, "test", unit.run, results)
                rsum = next(iter(results.values()))["rsum"]
                self.log(f"   {unit.cnn} n{unit.size} {unit.variant.name} split {unit.split} seed {unit.seed}: "
                         f"test rsum {rsum:.1f} ({time.perf_counter() - t:.0f} s)")
                return results
        except Busy:
            return None

    def run(self, train: bool = True) -> dict:
        """Run (or resume, or join) the grid, then summarise whatever is finished; with
        ``train`` False, only summarise (the runs finished so far, by any worker)."""
        saved = self.out / "study.json"
        if saved.exists():
            old = Grid.from_dict(read_json(saved, f"delete {saved} to start the study afresh").get("grid", {}))
            if _fixed(old) != _fixed(self.grid):
                raise FnemmError(f"{saved}: this study was started with another presets/patience/epochs/crops/"
                                 f"max-images; re-run with the same options or choose another --out")
        if not train:
            if not saved.exists() and not (self.out / "runs").is_dir():     # a mistyped --out, or nothing carried
                raise FnemmError(f"{self.out}: no study here (no study.json, no runs/) to report; check --out, or "
                                 f"run the study into it (without --report-only), or --carry DIR its records")
            return self.summarise(self.units())
        make_folder(self.out)
        atomic_write_json(saved, {"grid": self.grid.to_dict()})
        self._write_splits()
        self.base_stores()
        units = self.units()
        self.log(f"== {len(units)} runs ({sum(metrics_path(u.run, 'test').exists() for u in units)} done) -> "
                 f"{self.out / 'runs'}")
        for k, unit in enumerate(units):
            if not metrics_path(unit.run, "test").exists():
                self.log(f"-- [{k + 1}/{len(units)}] {unit.cnn} n{unit.size} {unit.variant.name} "
                         f"split {unit.split} seed {unit.seed}")
                self.run_one(unit)
        return self.summarise(units)

    def started(self) -> list[tuple[Unit, int]]:
        """[(a started but unfinished run, its epochs so far)]; how many are finished is the
        summary's "progress"."""
        return [(u, len(epoch_history(u.run))) for u in self.units()
                if not metrics_path(u.run, "test").exists() and (u.run / "metrics.jsonl").exists()]

    # --- results ---------------------------------------------------------------
    def summarise(self, units: list[Unit]) -> dict:
        rows, ranks, training = {}, {}, {}
        progress = {"full": [0, 0], "curve": [0, 0]}           # [finished, in the grid]
        for u in units:
            done = metrics_path(u.run, "test").exists()
            counts = progress["full" if u.size == self.full else "curve"]
            counts[0], counts[1] = counts[0] + done, counts[1] + 1
            if done:
                self.check_config(u)
                key = (u.cnn, u.size, u.variant.name, u.split, u.seed)
                rows[key] = next(iter(load_metrics(u.run, "test").values()))
                if (r := load_ranks(u.run, "test")) is not None:
                    ranks[key] = r
                training[key] = training_summary(u.run)
        summary = {**summarise(rows, self.grid, self.full, ranks, training), "progress": progress}
        # the grid these results are of: workers sharing an --out may each run part of one
        # grid, and an export redraws the records with the grid it was given
        atomic_write_json(self.out / "study.json", {"grid": self.grid.to_dict(), **summary})
        from fnemm_studies.study_report import write_report
        write_report(self.out, summary, self.grid, self.dataset, {name: v.about for name, v in BY_NAME.items()},
                     (preset_of(self.grid.presets, False), preset_of(self.grid.presets, True)))
        return summary
