"""``fnemm demo``: the whole method on real data, on a laptop.

flickr8k-1k (the 1,000 bundled Flickr8K photos, official captions and splits) ->
MobileNetV2 FNE + baseline features (10 crops) -> FNE-MH, FC7-MH and FNE-POE with
the ``demo/`` presets -> test recall@K -> report.md with a table, validation
curves and a retrieval contact sheet. Every stage reuses what an earlier run
finished (the feature store, each trained run, each evaluation).
"""

from __future__ import annotations

import time
from pathlib import Path

from fnemm.features.assembly import derive_store
from fnemm.joint.config import apply_overrides
from fnemm.joint.presets import get_preset
from fnemm.datasets import load_dataset
from fnemm.features.extraction import ExtractConfig, extract
from fnemm.features.store import load_features
from fnemm.io.files import atomic_write_text
from fnemm.features.recipe import Recipe
from fnemm.search.gallery import Gallery
from fnemm.eval.metrics import chance_rsum
from fnemm.io.errors import FnemmError
from fnemm_studies.report import default_baseline, load_run, markdown_table, plot_curves, verdict
from fnemm.training.folders import seed_dirs
from fnemm.training.runs import evaluate_runs, train_seeds
from fnemm_studies.sheets import image_to_text_sheet, text_to_image_sheet

MODELS = ("FNE-MH", "FC7-MH", "FNE-POE", "FNE-late-MH")
# each model: its demo preset, and the features it trains on when not the paper's FNE
# ("features"): FNE-late-MH is FNE-MH on the late layers, each centred and scaled over
# its RMS std, the recipe `fnemm study` found best (README: When the FNE helps)
SPECS = {"FNE-MH": ("demo/FNE-MH", None), "FC7-MH": ("demo/FC7-MH", None), "FNE-POE": ("demo/FNE-POE", None),
         "FNE-late-MH": ("demo/FNE-MH", Recipe(layers="late", post="center-layer"))}
QUERY = "a dog runs on the beach"
CAVEAT = ("These numbers come from {summary}: downscaled (~200 px) Flickr8K photos, a small "
          "training set and test set, MobileNetV2 instead of VGG16 and scaled-down presets. They show "
          "the method working on real data; they are NOT comparable to the paper's Flickr8K numbers "
          "(6,000 training images, 1,000 test images, VGG16).")


def _log(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def run_demo(out: str | Path = "runs/demo", data: str | Path | None = None, seeds: int = 1,
             models: tuple[str, ...] = MODELS, max_images: int | None = None, epochs: int | None = None,
             workers: int = 1, quiet: bool = False) -> dict:
    """Run (or finish) the demo into ``out``; returns {stage: seconds, 'table': markdown}.

    ``models``: which of MODELS to train (the first is the one whose retrieval examples are
    drawn). ``max_images`` and ``epochs`` shrink it (the integration test uses them)."""
    unknown = [m for m in models if m not in SPECS]
    if unknown or not models:
        raise FnemmError(f"demo models {unknown or '()'}: expected some of {', '.join(MODELS)}")
    out = Path(out)
    timings: dict[str, float] = {}
    spec = f"flickr8k-1k={data}" if data else "flickr8k-1k"
    dataset = load_dataset(spec)             # a clear error when the bundled data is not there
    if max_images:
        dataset = dataset.head(max_images)
    _log(quiet, f"== data: {dataset.summary()}")

    t = time.perf_counter()
    store = out / "features"
    _log(quiet, f"== 1/4 extract: MobileNetV2 FNE + baseline, 10 crops -> {store}")
    extract(dataset.images, store, dataset, ExtractConfig(cnn="mobilenet_v2", workers=workers), quiet=quiet)
    timings["extract"] = time.perf_counter() - t
    stores = _train_models(dataset, spec, store, out, models, seeds, epochs, timings, quiet)

    t = time.perf_counter()
    _log(quiet, "== 3/4 evaluate on the test images")
    for name in models:
        evaluate_runs(out / name, dataset, stores[name], "test", fresh=True)
    timings["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    _log(quiet, "== 4/4 report")
    runs = [load_run(out / name) for name in models]
    n_test = len(dataset.split_indices("test"))
    chance = chance_rsum(n_test)
    baseline = default_baseline(runs)
    table = markdown_table(runs, baseline=baseline)
    said = verdict(runs, baseline)
    plot = plot_curves(runs, out / "val_rsum.png")
    sheets = _retrieval_examples(out / models[0], dataset, stores[models[0]], out)
    timings["report"] = time.perf_counter() - t
    caveat = CAVEAT.format(summary=dataset.summary())
    atomic_write_text(out / "report.md", _report_text(dataset, runs, n_test, table, said, chance, caveat, plot,
                                                      sheets, models[0], timings))
    _log(quiet, "\nwall time of each stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    _log(quiet, f"\n{table}\n\n{said}\nchance rsum on {n_test} test images: {chance[0]:.1f} ± {chance[1]:.1f}"
                f"\n\n{caveat}\n\nreport: {out / 'report.md'}\nexamples: {sheets[0]} (text -> images), "
                f"{sheets[1]} (image -> captions)\nsearch these photos in a browser: make serve, then open "
                f"http://127.0.0.1:8000/")
    return {**timings, "table": table, "chance": chance[0], "verdict": said}


def _train_models(dataset, spec: str, store: Path, out: Path, models, seeds: int, epochs: int | None,
                  timings: dict, quiet: bool) -> dict[str, Path]:
    """Train each model (resuming what an earlier run left); {model: the store it trained on}."""
    stores = {}
    train_ids = {dataset.image_ids[k] for k in dataset.split_indices("train")}
    for k, name in enumerate(models, 1):
        preset, recipe = SPECS[name]
        stores[name] = store
        if recipe is not None:        # other features of the same images: from raw.npy, no forward pass
            stores[name] = out / f"features-{name.split('-')[1]}"
            derive_store(store, stores[name], train_ids, recipe)
        config = get_preset(preset)
        if epochs:
            config = apply_overrides(config, [f"stages.max_epochs={epochs}"])
        features = load_features(stores[name], config.features)
        t = time.perf_counter()
        _log(quiet, f"== 2/4 train {name}, model {k} of {len(models)} ({preset} on {stores[name].name}) "
                    f"x {seeds} seed(s) -> {out / name}")
        train_seeds(config, dataset, features, out / name, seeds, resume=True, quiet=quiet,
                    run_info={"preset": preset, "label": name,
                              "args": {"dataset": [spec], "features": str(stores[name])}},
                    log=None if quiet else print)
        timings[f"train {name}"] = time.perf_counter() - t
    return stores


def _report_text(dataset, runs, n_test: int, table: str, said: str, chance: tuple[float, float], caveat: str,
                 plot: Path, sheets: tuple[Path, Path], first: str, timings: dict) -> str:
    stage_lines = "\n".join(f"| {k} | {v:.0f} s |" for k, v in timings.items())
    return f"""# fnemm demo: Full-Network Embedding on flickr8k-1k

{dataset.summary()}; CNN: MobileNetV2 (ImageNet, the bundled .tflite), 10 crops;
{", ".join(f"{r.label}: {len(r.seeds)} seed(s)" for r in runs)}; test = {n_test} images x 5 captions.

{table}

{said}
Intervals: 95% bootstrap over the {n_test} test images (and the seeds); Δ: the same test images
in every draw. Chance level (random embeddings, same test set): rsum {chance[0]:.1f} ± {chance[1]:.1f}.

> {caveat}

## Validation rsum per epoch

![validation rsum]({plot.name})

## Retrieval examples ({first}, seed 0, test images)

A test caption -> the 5 test images that fit it best (the true image framed in green,
added with its rank when it is not among them):

![text to images]({sheets[0].name})

A test image -> the 5 test captions that fit it best (its own captions in green):

![image to captions]({sheets[1].name})

## Wall time of each stage (this run; reused stages take seconds)

| stage | time |
|---|---|
{stage_lines}
"""


def _retrieval_examples(model_dir: Path, dataset, store: Path, out: Path) -> tuple[Path, Path]:
    """Contact sheets of three test captions (text -> images) and three test images
    (image -> captions), with the right answers marked."""
    gallery = Gallery.from_store(seed_dirs(model_dir)[0], store, dataset, "test", encoder=False)
    test = dataset.split_indices("test")
    picks = test[:: max(1, len(test) // 3)][:3]
    queries = [(dataset.captions[k][0], dataset.image_ids[k]) for k in picks]
    return (text_to_image_sheet(gallery, queries, out / "retrieval.png"),
            image_to_text_sheet(gallery, [dataset.image_ids[k] for k in picks], out / "annotation.png"))


def best_model(out: str | Path = "runs/demo") -> str:
    """The demo's model with the highest mean test rsum (its report's best), for `make serve`;
    FNE-late-MH (the recipe the study recommends) when none has been evaluated yet."""
    best, best_rsum = "FNE-late-MH", -1.0
    for name in MODELS:
        try:
            run = load_run(Path(out) / name)
        except FnemmError:
            continue
        if run.mean_std("rsum")[0] > best_rsum:
            best, best_rsum = name, run.mean_std("rsum")[0]
    return best
