"""Fine-tuning the CNN end to end (VSE++'s second lever), from a converged FC7 run.

    images -> CNN (the last N blocks train, the rest frozen) -> the baseline layer,
    pooled and L2-normalised (exactly a store's fc7 row) -> the image map  ...  text as before

:func:`finetune` starts from a frozen-feature run trained on ``fc7`` (its best.pt: the
image map, the text side, the vocabulary) and trains on the images themselves: a
random-resized crop (torchvision's defaults, on the image as extraction resizes it,
256 x 256) and a horizontal flip per training image, drawn from (seed, epoch, image) so
that a resumed run, and each process of a DDP run, sees the same crops; validation
embeds the 10 crops extraction
uses, averaged. The CNN's trained blocks learn at ``cnn_lr_scale`` x the stage's
learning rate; batch-norm statistics stay frozen unless ``train_bn``.

The run folder gets ``cnn.pt`` (fnemm.features.cnn.finetuned: the fine-tuned network, usable
as ``fnemm extract --weights RUN/cnn.pt``) beside best.pt, which records its sha256
as the weights its features must come from: evaluation, search and the service then
take a store extracted with that file, and refuse one made with other weights. FNE
pipelines on the fine-tuned CNN train on such a store like on any other (its
statistics and codes come from the fine-tuned network).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import warnings
from torch import nn

from fnemm.joint.checkpoint import checkpoint_file, listed_images, load_checkpoint, recorded_store, resolve_device
from fnemm.training.augment import ImageBank, random_resized_crop, readable
from fnemm.features.cnn import build_cnn
from fnemm.features.cnn import finetuned as cnn_file
from fnemm.training.trunk import Trunk
from fnemm.joint.config import FinetuneConfig, TrainConfig, validate
from fnemm.joint.inputs import SplitData, split_data
from fnemm.datasets import Dataset
from fnemm.io.errors import FnemmError
from fnemm.features.images import resolve_paths
from fnemm.features.store import load_features
from fnemm.io.files import atomic_write_bytes, load_torch_data, located, read_json, relative_to
from fnemm.features.fne import RESIZE
from fnemm.io.locks import folder_lock
from fnemm.io.progress import say
from fnemm.training.trainer import Trainer

class FineTuneModel(nn.Module):
    """Trunk + joint embedding: what DDP wraps and an optimiser steps."""

    def __init__(self, trunk: Trunk, joint: nn.Module, amp: bool):
        super().__init__()
        self.trunk, self.joint, self.amp = trunk, joint, amp

    def forward(self, pixels, tokens, lengths):
        cuda = pixels.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.amp and cuda else contextlib.nullcontext():
            features = self.trunk(pixels)
        return self.joint(features.float(), tokens, lengths)


# --- the image side -------------------------------------------------------------------

class Photos:
    """The image side of a fine-tuning run (a trainer's ``images``; see
    fnemm.training.image_side.FeatureRows for what one answers): the photos through the
    CNN's trunk, its trained blocks at ``cnn_lr_scale`` x the stage's lr, saved in every
    checkpoint, and exported as cnn.pt beside each best.pt."""

    def __init__(self, trunk: Trunk, banks: dict[str, ImageBank], start_model: dict, config: TrainConfig,
                 device: str, export: dict, seen_before: tuple[str, ...] | list[str] = ()):
        self.trunk, self.banks, self.start_model, self.export = trunk, banks, start_model, export
        self.seen_before = list(seen_before)         # the start run's training images
        self.finetune, self.seed, self.device = config.finetune, config.seed, device
        self.lr_scale = config.finetune.cnn_lr_scale
        self.n_crops = int(export.get("crops", 10))

    def wrap(self, model: nn.Module) -> nn.Module:
        model.load_state_dict(self.start_model)      # the converged frozen-feature run
        self.trunk.to(self.device)
        return FineTuneModel(self.trunk, model, self.finetune.amp).to(self.device)

    def parameters(self) -> list:
        return self.trunk.trained_parameters()

    def batch(self, idx: np.ndarray, epoch: int) -> torch.Tensor:
        # each image's crop a function of (seed, epoch, image) alone: a resumed run, and every
        # process of a DDP run (which draws only its share), see the single run's crops
        scale = (self.finetune.crop_scale, 1.0)
        boxes = [random_resized_crop(np.random.default_rng((self.seed, epoch, int(k))), RESIZE, scale) for k in idx]
        return torch.from_numpy(self.banks["train"].augmented(idx, boxes)).to(self.device)

    def val_features(self) -> np.ndarray:
        bank, per = self.banks["val"], 32          # images per pass (x 10 crops)
        return np.concatenate([self.trunk.features(bank.eval_crops(self.n_crops, s, min(s + per, len(bank))),
                                                   self.n_crops, self.device)
                               for s in range(0, len(bank), per)])

    def embed_val(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            model.eval()
            return model.image(torch.from_numpy(self.val_features()).to(self.device))

    def state(self) -> dict:
        return {"cnn": self.trunk.trained_state()}

    def load_state(self, ckpt: dict) -> None:
        self.trunk.load_trained_state(ckpt["cnn"])

    # best.pt and cnn.pt: cnn.pt is written at each improvement, best.pt naming its sha256
    # later (with last.pt, at a stage's end), so within a run cnn.pt can be newer than
    # best.pt; after fit, sync_export re-creates it from best.pt when it is
    def _cnn_bytes(self, epoch: int) -> bytes:
        return cnn_file.to_bytes(self.export["cnn"], self.trunk.net.state_dict(), self.trunk.info,
                                 self.trunk.preprocess.to_dict(),
                                 {"epoch": epoch, "blocks": self.trunk.blocks, "from": self.export.get("from")})

    def best(self, payload: dict, epoch: int, out: Path) -> dict:
        data = self._cnn_bytes(epoch)
        atomic_write_bytes(out / "cnn.pt", data)
        sha = hashlib.sha256(data).hexdigest()
        producer = {**payload["features"].get("producer", {}), "weights": str((out / "cnn.pt").resolve()),
                    "weights_sha256": sha, "weights_format": "fnemm-cnn"}
        return {**payload, "features": {**payload["features"], "producer": producer}, "cnn_sha256": sha}

    def sync_export(self, out: Path) -> str:
        """Make cnn.pt the CNN of best.pt (after a kill between the two writes); its sha256."""
        best = load_torch_data(out / "best.pt", "resume the run to write it again")
        path = out / "cnn.pt"
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == best["cnn_sha256"]:
            return best["cnn_sha256"]
        current = self.trunk.trained_state()
        self.trunk.load_trained_state(best["cnn"])
        data = self._cnn_bytes(best["epoch"])
        self.trunk.load_trained_state(current)
        if hashlib.sha256(data).hexdigest() != best["cnn_sha256"]:
            raise FnemmError(f"{path}: cannot be re-created as best.pt recorded it; fine-tune again in a new --out")
        atomic_write_bytes(path, data)
        return best["cnn_sha256"]


# --- the entry point ----------------------------------------------------------------------

FINETUNABLE = {"mobilenet_v2": "mobilenet_v2_float"}     # int8-grid rounding has no useful gradient


def start_run(path: str | Path, features: str | Path | None = None) -> tuple[dict, Path, dict]:
    """(the start run's best.pt, its feature store (``features``: where it is now), that
    store's manifest), checked."""
    model, vocab, config, ckpt = load_checkpoint(path)
    where = checkpoint_file(path)
    if config.features != "fc7":
        raise FnemmError(f"{where}: trained on {config.features} features; fine-tuning starts from a run on the "
                         f"baseline layer (features=fc7, e.g. a FC7-MH preset)")
    if config.finetune is not None:
        raise FnemmError(f"{where}: already a fine-tuning run; to continue it use --out {where.parent} --resume")
    source = (ckpt.get("features") or {}).get("source")
    if features is not None:
        if not (Path(features) / "manifest.json").is_file():
            raise FnemmError(f"{features}: no feature store there; pass --features STORE (where the store {where} "
                             f"was trained on is now)")
        return ckpt, Path(features), read_json(Path(features) / "manifest.json", "re-run `fnemm extract`")
    store = recorded_store(ckpt.get("features") or {}, where.parent)
    if store is None:
        raise FnemmError(f"{where}: its feature store ({source}) is not there; fine-tuning reads the images and "
                         f"CNN it names. Pass --features STORE (the store the run was trained on)")
    return ckpt, store, read_json(store / "manifest.json", "re-run `fnemm extract`")


def finetune_config(start: str | Path, overrides: list[str] | tuple = ()) -> TrainConfig:
    """The config of a fine-tuning run from ``start``: the start run's (its model, loss,
    margin, learning rate, batch, seed), the curriculum's last stage only, ``finetune``
    at its defaults; then ``overrides`` (``finetune.blocks=3``, ``stages.max_epochs=10``...)."""
    from fnemm.joint.config import apply_overrides
    _, _, base, ckpt = load_checkpoint(start)
    config = replace(base, stages=base.stages[-1:], finetune=FinetuneConfig())
    return apply_overrides(config, list(overrides))


def _start_cnn(name: str, store: Path, manifest: dict, feature_dim: int):
    """The CNN to fine-tune, built with the weights the start store was extracted with."""
    if name in FINETUNABLE:
        raise FnemmError(f"--cnn {name}: its activations are rounded to the int8 grid, which passes no useful "
                         f"gradient; pass --finetune-cnn {FINETUNABLE[name]} (the same weights as a float network)")
    weights = manifest.get("weights")
    if manifest.get("weights_sha256") and not (weights and Path(weights).is_file()):
        raise FnemmError(f"{store}: its CNN weights {weights} are not here; fine-tuning starts from them")
    built = build_cnn(name, weights if manifest.get("weights_sha256") else None)
    if manifest.get("weights_sha256") and built.info.get("weights_sha256") != manifest["weights_sha256"]:
        raise FnemmError(f"--finetune-cnn {name}: not the weights {store} was extracted with")
    if built.baseline.channels != feature_dim:
        raise FnemmError(f"--finetune-cnn {name}: its baseline layer has {built.baseline.channels} features, the "
                         f"start run's image map takes {feature_dim}")
    return built


def _photo_splits(dataset: Dataset, feats, vocab, folder: Path, config: TrainConfig, workers: int):
    """(train and val data, their photo banks, {image: why} of the photos that cannot be read)."""
    splits, banks, skipped = {}, {}, {}
    for split in ("train", "val"):
        data = split_data(dataset, feats, vocab, split)
        ok, bad = readable(resolve_paths(folder, data.image_ids))
        skipped.update({data.image_ids[k]: why for k, why in bad.items()})
        if len(ok) < len(data):
            data = SplitData([data.image_ids[k] for k in ok], data.features[ok], [data.captions[k] for k in ok])
        if split == "val" and config.val_images and len(data) > config.val_images:
            data = data.head(config.val_images)
        if len(data) < 2:
            raise FnemmError(f"{folder}: fewer than 2 readable {split} images; check --images")
        splits[split] = data
        banks[split] = ImageBank(resolve_paths(folder, data.image_ids), workers)
    return splits, banks, skipped


def finetune(start: str | Path, dataset: Dataset, out_dir: str | Path, *, config: TrainConfig | None = None,
             images: str | Path | None = None, features: str | Path | None = None, cnn: str | None = None,
             resume: bool = False, device: str = "cpu", quiet: bool = False, workers: int = 4,
             checkpoint_every: float = 120.0, run_info: dict | None = None) -> dict:
    """Fine-tune the CNN of the FC7 run ``start`` on ``dataset``'s photos into ``out_dir``.

    ``config``: default :func:`finetune_config` (the start run's). ``images``: the photos
    (default: the folder the start store was extracted from). ``cnn``: the network to
    fine-tune (default: the store's; the int8-grid ``mobilenet_v2`` must be named as
    ``mobilenet_v2_float``, the same weights as a float network)."""
    from fnemm.training import distributed
    device = resolve_device(device)
    ckpt, store, manifest = start_run(start, features)
    name = cnn or manifest["cnn"]
    built = _start_cnn(name, store, manifest, ckpt["feature_dim"])
    base = TrainConfig.from_dict(ckpt["config"])
    if config is None:
        config = finetune_config(start)
    elif config.finetune is None:
        config = replace(config, finetune=FinetuneConfig())
    if config.model != base.model:
        raise FnemmError("the model's shape (model.*) comes from the start run; fine-tuning cannot change it")
    validate(config)
    trunk = Trunk(built, config.finetune.blocks, config.finetune.train_bn)

    from fnemm.joint.text import Vocab
    vocab = Vocab(ckpt["vocab"], config.max_caption_tokens)
    feats = load_features(store, "fc7")
    folder = Path(images) if images else located(store, manifest, "images_dir")
    if folder is None or not folder.is_dir():
        raise FnemmError(f"{store}: the images it was extracted from ({manifest.get('images_dir')}) are not there; "
                         f"pass --images DIR")
    splits, banks, skipped = _photo_splits(dataset, feats, vocab, folder, config, workers)
    if skipped:
        k, why = next(iter(skipped.items()))
        warnings.warn(f"{len(skipped)} image(s) cannot be read and are left out of fine-tuning "
                      f"(e.g. {k}: {why}); listed in run.json", stacklevel=2)
    dist, device = distributed.from_env(device)
    producer = {k: manifest[k] for k in ("preprocess", "input_size", "resize", "crop", "crops", "taps", "groups",
                                         "baseline") if k in manifest}
    producer.update({"cnn": name, **({"quant": built.info["quant"]} if "quant" in built.info else {})})
    producer.pop("groups", None)
    start_file = checkpoint_file(start)
    run_info = dict(run_info or {})
    if "label" not in run_info:                   # the start run's name + "-ft" (FC7-MH-ft)
        from fnemm.training.folders import label_of, run_preset
        home = start_file.parent
        label = read_json(home / "run.json", "").get("label") if (home / "run.json").exists() else None
        run_info["label"] = f"{label or label_of(run_preset(home), home)}-ft"
    info = {"dataset": dataset.name, "n_train": len(splits["train"]), "n_val": len(splits["val"]),
            "features": {"source": str(store), "source_relative": relative_to(store, out_dir), "kind": "fc7",
                         "dim": trunk.dim, "producer": producer},
            # paths also relative to the run: found again when it moves together with them
            "finetune": {"from": str(start_file.resolve()), "from_relative": relative_to(start_file, out_dir),
                         "from_sha256": hashlib.sha256(start_file.read_bytes()).hexdigest(), "cnn": name,
                         "images_dir": str(folder.resolve()), "images_dir_relative": relative_to(folder, out_dir),
                         "skipped": skipped, "trained_modules": trunk.trained_modules},
            **{k: v for k, v in (run_info or {}).items() if k not in ("features", "finetune")}}
    # the start run as seen from this run's folder: the same bytes in cnn.pt whether the run
    # was started or resumed, from any working directory
    photos = Photos(trunk, banks, ckpt["model"], config, device,
                    export={"cnn": name, "crops": int(manifest.get("crops", 10)),
                            "from": relative_to(start_file, out_dir)},
                    seen_before=listed_images(ckpt, start_file) or [])
    trainer = Trainer(config, splits["train"], splits["val"], vocab, Path(out_dir), device, quiet, info,
                      checkpoint_every, dist, images=photos)
    main = dist is None or dist.main
    with folder_lock(Path(out_dir), "a training run") if main else contextlib.nullcontext():
        summary = trainer.fit(resume=resume)
        if main:
            summary["cnn_sha256"] = photos.sync_export(Path(out_dir))
    if not quiet and main:
        say(f"fine-tuned CNN: {Path(out_dir) / 'cnn.pt'} (sha256 {summary.get('cnn_sha256', '')[:12]}...)")
    return summary


def finetune_seeds(start: str | Path, dataset: Dataset, out: str | Path, seeds: int | None = None,
                   overrides: list[str] | tuple = (), *, log=None, resume: bool = False, **kwargs) -> list[dict]:
    """Fine-tune every seed of a seeds folder ``start`` (seed-K -> ``out``/seed-K; the first
    ``seeds`` of them), or the single run ``start`` into ``out``, each with its start run's
    config (finetune_config) and ``overrides``."""
    from fnemm.training.folders import seed_dirs
    start = Path(start)
    runs = seed_dirs(start) if start.is_dir() and not (start / "best.pt").exists() else [start]
    if seeds is not None:
        if seeds > len(runs):
            raise FnemmError(f"--seeds {seeds}: {start} holds {len(runs)} run(s) to fine-tune")
        runs = runs[:seeds]
    if runs != [start]:                  # run.json says how many, so --resume starts the same number
        kwargs["run_info"] = {**(kwargs.get("run_info") or {}), "seeds": len(runs)}
    summaries = []
    for run in runs:
        target = Path(out) / run.name if run != start else Path(out)      # a seeds folder: seed-K -> seed-K
        if log:
            log(f"--- fine-tuning {run} -> {target}")
        summaries.append(finetune(run, dataset, target, config=finetune_config(run, overrides),
                                  resume=resume and (target / "last.pt").exists(), **kwargs))
    return summaries


def recorded_start(run: Path, ft: dict) -> Path:
    """The start run's best.pt a fine-tuning run's record (run.json's "finetune") names:
    beside the run if the two moved together, else where it was."""
    return located(run, ft, "from") or Path(ft.get("from", ""))


def recorded_images(run: Path, ft: dict) -> str | Path | None:
    """The photos folder a fine-tuning run's record names, found the same way."""
    return located(run, ft, "images_dir") or ft.get("images_dir")


def resume_finetune(out: str | Path, dataset=None, *, features: str | Path | None = None,
                    images: str | Path | None = None, device: str = "cpu", quiet: bool = False,
                    checkpoint_every: float = 120.0) -> dict:
    """Continue the fine-tuning run in ``out`` from its folder (run.json names its start
    run, CNN, photos and store; the start run must be unchanged). ``features`` and
    ``images``: the store and the photos, where they moved since."""
    from fnemm.training.folders import run_dataset, saved_config, saved_info
    out = Path(out)
    config, info = saved_config(out), saved_info(out)
    ft = info.get("finetune") or {}
    start = recorded_start(out, ft)
    if not start.is_file():
        raise FnemmError(f"{out}: the run it fine-tunes from ({start}) is not there; it is needed to resume")
    if hashlib.sha256(start.read_bytes()).hexdigest() != ft.get("from_sha256"):
        raise FnemmError(f"{start}: changed since {out} started fine-tuning from it; start a new --out")
    dataset = run_dataset(out, dataset)
    keep = {k: v for k, v in info.items() if k in ("preset", "overrides", "args", "label")}
    record = info.get("features") or {}
    return finetune(start, dataset, out, config=config, images=images or recorded_images(out, ft),
                    features=features or recorded_store(record, out) or record.get("source"), cnn=ft.get("cnn"),
                    resume=True, device=device, quiet=quiet, checkpoint_every=checkpoint_every, run_info=keep)
