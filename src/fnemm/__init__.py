"""fnemm: image-caption retrieval with the Full-Network Embedding.

Library entry points (the CLI calls these)::

    from fnemm import (extract, load_dataset, load_features, get_preset, train, resume, train_seeds,
                       evaluate, open_model, Gallery, build_index, finetune, embed_images, embed_texts)
"""

__version__ = "0.1.0"

from fnemm.checkpoint import load_checkpoint, open_model
from fnemm.config import PRESETS, ModelConfig, StageConfig, TrainConfig, apply_overrides, get_preset
from fnemm.datasets import Dataset, load_dataset
from fnemm.embed import embed_images, embed_texts
from fnemm.errors import FnemmError
from fnemm.evaluation import evaluate
from fnemm.extraction import ExtractConfig, extract
from fnemm.features import Features, load_features, write_store
from fnemm.finetune import finetune
from fnemm.gallery import Gallery, Hit, Searcher
from fnemm.index_folder import build_index
from fnemm.recipe import Recipe
from fnemm.runs import evaluate_runs, resume, train_seeds
from fnemm.train import train

__all__ = ["PRESETS", "Dataset", "ExtractConfig", "Features", "FnemmError", "Gallery", "Hit", "ModelConfig",
           "Recipe", "Searcher", "StageConfig", "TrainConfig", "apply_overrides", "build_index", "embed_images",
           "embed_texts", "evaluate", "evaluate_runs", "extract", "finetune", "get_preset", "load_checkpoint", "load_dataset", "load_features",
           "open_model", "resume", "train", "train_seeds", "write_store"]
