"""fnemm: image-caption retrieval with the Full-Network Embedding.

Library entry points (the CLI calls these):

    from fnemm import extract, load_dataset, load_features, get_preset, train, evaluate, Searcher
"""

__version__ = "0.1.0"

from fnemm.config import PRESETS, ModelConfig, StageConfig, TrainConfig, apply_overrides, get_preset
from fnemm.datasets import Dataset, load_dataset
from fnemm.errors import FnemmError
from fnemm.extraction import ExtractConfig, extract
from fnemm.features import Features, load_features, write_store
from fnemm.search import Searcher
from fnemm.train import evaluate, load_checkpoint, train

__all__ = ["PRESETS", "Dataset", "ExtractConfig", "Features", "FnemmError", "Searcher", "ModelConfig", "StageConfig", "TrainConfig",
           "apply_overrides", "evaluate", "extract", "get_preset", "load_checkpoint", "load_dataset", "load_features",
           "train", "write_store"]
