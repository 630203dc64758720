"""fnemm: image-caption retrieval with the Full-Network Embedding.

Library entry points (the CLI calls these)::

    from fnemm import (extract, load_dataset, load_features, get_preset, train, resume, train_seeds,
                       evaluate, open_model, Gallery, build_index, finetune, embed_images, embed_texts)

The package is laid out as its data flows (each layer imports only the ones before it;
tests/test_layers.py holds it to that)::

    io/         errors, atomic files, locks, progress, paths, fault injection
    datasets/   captions and splits from every supported layout
    features/   images -> CNN -> the Full-Network Embedding -> a feature store
    joint/      the joint image-text model: config, presets, text, model, losses, checkpoints
    training/   the trainer, DDP, fine-tuning, run folders      eval/  metrics, protocols
    search/     galleries, vector indexes, index folders, the HTTP service, embeddings
    cli/        the fnemm command

``import fnemm`` is light: the names below are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib

from fnemm.io.version import __version__

_EXPORTS = {
    "FnemmError": "fnemm.io.errors",
    "Dataset": "fnemm.datasets", "load_dataset": "fnemm.datasets",
    "ExtractConfig": "fnemm.features.extraction", "extract": "fnemm.features.extraction",
    "Features": "fnemm.features.store", "load_features": "fnemm.features.store", "write_store": "fnemm.features.store",
    "Recipe": "fnemm.features.recipe",
    "ModelConfig": "fnemm.joint.config", "StageConfig": "fnemm.joint.config", "TrainConfig": "fnemm.joint.config",
    "apply_overrides": "fnemm.joint.config", "with_warmup": "fnemm.joint.config",
    "PRESETS": "fnemm.joint.presets", "get_preset": "fnemm.joint.presets",
    "load_checkpoint": "fnemm.joint.checkpoint", "open_model": "fnemm.joint.checkpoint",
    "evaluate": "fnemm.eval.protocols",
    "train": "fnemm.training.trainer",
    "evaluate_runs": "fnemm.training.runs", "resume": "fnemm.training.runs", "train_seeds": "fnemm.training.runs",
    "fit": "fnemm.training.runs",
    "finetune": "fnemm.training.finetune",
    "Gallery": "fnemm.search.gallery", "Hit": "fnemm.search.gallery", "Searcher": "fnemm.search.gallery",
    "build_index": "fnemm.search.index_folder",
    "embed_images": "fnemm.search.embed", "embed_texts": "fnemm.search.embed",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fnemm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value          # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
