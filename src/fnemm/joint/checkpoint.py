"""A trained model on disk, and opening it against image features.

A checkpoint (``best.pt`` / ``last.pt`` of a run folder) is a torch pickle of::

    {"format": "fnemm-checkpoint", "version": 1,
     "config": TrainConfig as a dict, "vocab": [words...], "feature_dim": D,
     "features": {"source", "kind", "dim", "producer": {what made the training features}},
     "model": state dict, ...}          (last.pt adds the optimiser, RNG and counters)

:func:`open_model` is the one way in for everything that uses a trained model
(evaluation, search, indexes, the service): it loads the checkpoint, reads the
features with the kind it was trained on, and refuses features of another width or
made another way (CNN, weights, crops, layers, post-processing, the statistics and PCA
fitted on the training images), from what the
checkpoint itself records: a ``best.pt`` copied without its run folder is checked too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fnemm.joint.config import TrainConfig
from fnemm.io.errors import FnemmError
from fnemm.io.files import load_torch_data, read_json
from fnemm.features.store import FEATURE_KEYS, Features, load_features
from fnemm.joint.model import JointEmbedding
from fnemm.joint.text import Vocab

FORMAT = "fnemm-checkpoint"


def resolve_device(device: str) -> str:
    """'cpu', 'cuda', 'cuda:N', or 'auto' (cuda when there is one): checked before any work,
    so that a device this machine lacks (no GPU, or cuda:N past its last one) is one line
    here instead of a CUDA error at the first tensor moved there, after the data loaded."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise FnemmError(f"--device {device}: expected cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise FnemmError(f"--device {device}: no CUDA device is available here; use --device cpu")
    count = torch.cuda.device_count()
    if device != "cuda" and int(device[5:]) >= count:
        raise FnemmError(f"--device {device}: this machine has {count} CUDA device{'s' * (count != 1)} "
                         f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); pick one of them, or --device cuda")
    return device


def tensors_copied(obj):
    """``obj`` with every tensor in it (nested dicts, lists, tuples) copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: tensors_copied(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tensors_copied(v) for v in obj)
    return obj


def checkpoint_file(path: str | Path) -> Path:
    """``path`` itself, or the ``best.pt`` of a run folder."""
    path = Path(path)
    return path / "best.pt" if path.is_dir() else path


def _not_a_run(folder: Path) -> str:
    """What a folder given for a run is instead, when it says (for the error that it is no run)."""
    if (folder / "seed-0").is_dir():
        return f"; {folder} holds seeds: pass one, e.g. {folder / 'seed-0'}"
    if (folder / "metrics-test.json").is_file() and not (folder / "last.pt").exists():
        return (f"; {folder} holds a finished run's records (its numbers), not its weights, which stay where it "
                f"was trained (a study's exported or carried records): train it again here to use the model")
    try:
        made = read_json(folder / "manifest.json", "").get("format") if (folder / "manifest.json").is_file() else None
    except FnemmError:
        made = None
    return {"fnemm-index": f"; {folder} is an index folder: search it with --index {folder}",
            "fnemm-features": f"; {folder} is a feature store, not a run"}.get(made, "")


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict (tensors on the CPU), or a one-line error naming the file."""
    path = checkpoint_file(path)
    if not path.exists():
        raise FnemmError(f"{path}: no such checkpoint; pass a run folder or its best.pt "
                         f"(written after the first training epoch){_not_a_run(path.parent)}")
    ckpt = load_torch_data(path, "is it an fnemm best.pt? (a damaged one: re-train, or resume the run)")
    needed = ("config", "vocab", "feature_dim", "model")
    if ckpt.get("format") != FORMAT or any(k not in ckpt for k in needed):
        raise FnemmError(f"{path}: not an fnemm checkpoint")
    check_run_id(path, ckpt)
    return ckpt


def check_run_id(path: Path, ckpt: dict) -> None:
    """In a run folder, the checkpoint must be that run's: the id in its run.json (runs
    made before ids, and a checkpoint copied on its own, have none to compare)."""
    run_json = path.parent / "run.json"
    if ckpt.get("run_id") is None or not run_json.is_file():
        return
    theirs = read_json(run_json, "the run folder is damaged; re-train the run").get("run_id")
    if theirs is not None and theirs != ckpt["run_id"]:
        raise FnemmError(f"{path}: from another run (run id {ckpt['run_id'][:8]}…, but {run_json} says "
                         f"{str(theirs)[:8]}…); copy a run's folder whole, or train it again")


def unfinished(path: str | Path) -> bool:
    """Whether the run.json beside checkpoint ``path`` (or in run folder ``path``) says its
    run has not trained to its end: still running, or stopped before it (the trainer writes
    "training" at the start, "finished" at the end). Runs from before it said so, and a
    checkpoint copied on its own, count as finished."""
    run_json = checkpoint_file(path).parent / "run.json"
    return run_json.is_file() and read_json(run_json, "the run folder is damaged").get("state") == "training"


LISTS = {"train_images": "training", "val_images": "validation"}


def listed_images(ckpt: dict, path: Path, key: str = "train_images") -> list[str] | None:
    """The ids a checkpoint lists under ``key``: "train_images", the images its model learnt
    from; "val_images", those whose validation rsum chose it (the best epoch). None when it
    does not say (made before checkpoints listed them). Kept as one JSON string: a list of
    113K strings takes 12x longer through ``weights_only`` loading (0.37 s against 0.03 s)."""
    listed = ckpt.get(key)
    try:
        ids = json.loads(listed) if isinstance(listed, str) else None
    except ValueError:
        ids = None
    if listed is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise FnemmError(f"{path}: its list of {LISTS[key]} images is damaged; re-train the run")
    return ids


def encode_images(ids: list[str]) -> str:
    """``ids`` as a checkpoint keeps them (see :func:`listed_images`)."""
    return json.dumps(ids)


def image_lists(trained: list[str], chose: list[str]) -> dict[str, str]:
    """A checkpoint's lists (:func:`listed_images`): the images its model learnt from
    (``trained``, first seen first, each once) and those whose validation rsum chose it."""
    return {"train_images": encode_images(list(dict.fromkeys(trained))), "val_images": encode_images(list(chose))}


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[JointEmbedding, Vocab, TrainConfig, dict]:
    """(model in eval mode, vocab, config, raw checkpoint) of a ``best.pt``/``last.pt`` or a run folder."""
    device = resolve_device(device)
    ckpt = read_checkpoint(path)
    try:
        config = TrainConfig.from_dict(ckpt["config"])
        vocab = Vocab(ckpt["vocab"], config.max_caption_tokens)
        model = JointEmbedding(config.model, len(vocab), ckpt["feature_dim"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise FnemmError(f"{checkpoint_file(path)}: a checkpoint this fnemm cannot rebuild "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return model.to(device).eval(), vocab, config, ckpt


def recorded_store(record: dict, run: str | Path) -> Path | None:
    """The feature store a run's record (``{"source", "source_relative"}``, as a checkpoint
    and run.json keep it) names: beside the run folder ``run`` as it was (the two moved
    together), else at its absolute path; None when neither holds a store."""
    from fnemm.io.files import located
    found = located(run, record, "source")
    return found if found is not None and (found / "manifest.json").is_file() else None


def trained_store(checkpoint: str | Path) -> Path:
    """The feature store a checkpoint was trained on (where it recorded it), or a one-line
    error asking for ``--features``: what evaluation reads by default, and whose
    statistics put new images in the model's space."""
    ckpt = read_checkpoint(checkpoint)
    record, home = ckpt.get("features") or {}, checkpoint_file(checkpoint).parent
    source = record.get("source")
    if (ckpt.get("config") or {}).get("finetune"):   # its store is the frozen CNN's: never this model's
        raise FnemmError(f"{checkpoint_file(checkpoint)}: a fine-tuning run; its features come from its own CNN: "
                         f"extract them (`fnemm extract --cnn {(record.get('producer') or {}).get('cnn', 'NAME')} "
                         f"--weights {home / 'cnn.pt'} ...`) and pass that store as --features")
    if (found := recorded_store(record, home)) is not None:
        return found
    raise FnemmError(f"{checkpoint_file(checkpoint)}: the feature store it was trained on ({source}) is not "
                     f"there; pass --features STORE (that store, for its CNN and statistics)")


def check_features(ckpt: dict, features: Features, where: str | Path) -> None:
    """Refuse features of another width, or made differently from the training features
    when both say how they were made (the checkpoint's record, not the run folder's)."""
    if features.dim != ckpt["feature_dim"]:
        raise FnemmError(f"{features.source}: features have {features.dim} dimensions but {where} "
                         f"was trained on {ckpt['feature_dim']}; pass the same kind of features "
                         f"(the same store, and its fne or fc7 array) as in training")
    trained = (ckpt.get("features") or {}).get("producer") or {}
    if not features.manifest or not trained:
        return
    if trained.get("precision", "fp32") != features.manifest.get("precision", "fp32"):
        raise FnemmError(f"{features.source}: these features were made with the CNN in "
                         f"{features.manifest.get('precision', 'fp32')}, {where} was trained on "
                         f"{trained.get('precision', 'fp32')} ones; extract them the same way")
    for k in FEATURE_KEYS:
        if k in trained and trained[k] != features.manifest.get(k):
            made, was = _difference(k, features.manifest.get(k), trained[k])
            raise FnemmError(f"{features.source}: these features were made with {made}, {where} was trained on "
                             f"{was}; extract them the same way")
    if features.kind == "fne":
        _check_fitted(ckpt.get("features") or {}, features, where)


def _check_fitted(record: dict, features: Features, where: str | Path) -> None:
    """The FNE is standardised with statistics (and, with --pca, projected with components)
    fitted on the training images: the same recipe fitted on other images gives other
    features of the same width, and a model read through them scores a little or a lot off
    with nothing to show for it. Both must be the training store's, byte for byte, when
    the checkpoint records which (stores extracted with ``--stats`` from it copy them)."""
    trained = record.get("producer") or {}
    for part in ("stats", "pca"):
        expected = (trained.get(part) or {}).get("sha256")
        entry = features.manifest.get(part) or {}
        if expected:
            got = entry.get("sha256")
            if got is None and Path(features.source, entry.get("file", f"{part}.npy")).is_file():
                from fnemm.io.files import sha256_file
                got = sha256_file(Path(features.source, entry.get("file", f"{part}.npy")))
        elif part in trained and trained.get("train_ids_sha256") and features.manifest.get("train_ids_sha256"):
            # stores made before their statistics' hash was recorded: which training images
            expected, got = trained["train_ids_sha256"], features.manifest["train_ids_sha256"]
        else:
            continue
        if got != expected:
            what = {"stats": "standardised with statistics", "pca": "projected with PCA components"}[part]
            made = trained.get(part) or {}
            source = trained.get("stats_from") or record.get("source") or "the training store"
            raise FnemmError(f"{features.source}: these features are {what} fitted on other images than those "
                             f"{where} was trained with ({made.get('images', '?')} {made.get('split', 'train')} "
                             f"images); extract the images with --stats {source} (that store's {part}), or pass "
                             f"that store")


def _difference(key: str, made, trained) -> tuple[str, str]:
    """How two records of one key differ, said briefly: for two dicts (a recipe), only the
    fields that differ (the whole of two long recipes cut at 80 characters can read the same)."""
    if isinstance(made, dict) and isinstance(trained, dict):
        fields = [f for f in sorted(set(made) | set(trained), key=str) if made.get(f) != trained.get(f)]
        return (", ".join(f"{key}.{f}={_short(made.get(f))}" for f in fields),
                ", ".join(f"{key}.{f}={_short(trained.get(f))}" for f in fields))
    return f"{key}={_short(made)}", f"{key}={_short(trained)}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class OpenModel:
    """A checkpoint opened against its features: what evaluation and search need."""
    model: JointEmbedding
    vocab: Vocab
    config: TrainConfig
    checkpoint: dict
    path: Path                      # the checkpoint file
    features: Features | None
    device: str
    _encoder: object = field(default=None, init=False, repr=False)      # the store's CNN, on first use

    @property
    def similarity_kind(self) -> str:
        """'cosine' or 'order': how the model compares an image with a caption."""
        return self.config.model.similarity

    def encode_text(self, texts: str | list[str]) -> torch.Tensor:
        """(n, d) embeddings of sentences, L2-normalised (and non-negative for order models),
        as open_clip's ``model.encode_text``: rows comparable with :meth:`encode_image`'s."""
        from fnemm.joint.inputs import embed_captions
        texts = [texts] if isinstance(texts, str) else list(texts)
        return embed_captions(self.model, [self.vocab.encode(t) for t in texts], self.device)

    def encode_image(self, images) -> torch.Tensor:
        """(n, d) embeddings of images: files or PIL images, each run through the CNN and
        statistics of the model's feature store (its crops, layers and post-processing)."""
        from PIL import Image

        from fnemm.features.encode import StoreEncoder
        from fnemm.joint.inputs import embed_images
        images = [images] if isinstance(images, (str, Path, Image.Image)) else list(images)
        if self._encoder is None:
            store = self.features.source if self.features is not None and self.features.manifest else \
                (self.checkpoint.get("features") or {}).get("source")
            if not store or not (Path(store) / "manifest.json").is_file():
                raise FnemmError(f"{self.path}: encoding photos needs the feature store the model was trained on "
                                 f"({store}): its CNN and statistics; open the model with features=STORE")
            self._encoder = StoreEncoder(store, self.device)
        rows = [self._encoder.encode_image(im) if isinstance(im, Image.Image) else self._encoder.encode(im)
                for im in images]
        import numpy as np
        feats = np.concatenate([r[self.config.features] for r in rows]) if rows else \
            np.zeros((0, self.checkpoint["feature_dim"]), np.float32)
        return embed_images(self.model, feats, self.device)

    def similarity(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """The (n_images, n_texts) scores of embeddings from encode_image and encode_text,
        with the model's own similarity (cosine: dot products; order: Eq. 3)."""
        from fnemm.joint.losses import scores
        with torch.no_grad():
            return scores(images, texts, self.similarity_kind)


def open_model(checkpoint: str | Path, features: Features | str | Path | None = None, device: str = "cpu",
               ids: str | Path | None = None) -> OpenModel:
    """Load ``checkpoint`` (a run folder or a .pt) and, given ``features`` (loaded, or a
    store folder / .npy read with the kind the model was trained on), check that they
    belong together."""
    device = resolve_device(device)
    model, vocab, config, ckpt = load_checkpoint(checkpoint, device)
    path = checkpoint_file(checkpoint)
    if features is not None and not isinstance(features, Features):
        features = load_features(features, config.features, ids)
    if features is not None:
        check_features(ckpt, features, path)
    return OpenModel(model, vocab, config, ckpt, path, features, device)
