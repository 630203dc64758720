"""Where a training run's images come from: the trainer asks one object for them.

:class:`FeatureRows` (a frozen-feature run: rows of a feature store) is the default;
fine-tuning (fnemm.training.finetune.Photos) passes one whose images are photos read
through a CNN it trains too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fnemm.joint.inputs import SplitData, embed_images
from fnemm.joint.model import JointEmbedding


class FeatureRows:
    """The image side of a frozen-feature run: rows of a feature store. What an image
    side answers (fnemm.training.finetune.Photos answers the same):

    - ``wrap(model)``: the module a batch goes through (before DDP), given the joint model;
    - ``parameters()``: what it trains besides the joint model, at ``lr_scale`` x the stage's lr;
    - ``batch(idx, epoch)``: the image input of a batch of training images;
    - ``embed_val(model)``: the validation images' embeddings;
    - ``state()`` / ``load_state(ckpt)``: what it keeps in every checkpoint;
    - ``best(payload, epoch, out)``: best.pt's contents (writing first what belongs with it);
    - ``seen_before``: the ids of images the model learnt from before this run (a fine-tune's
      start run's).
    """
    lr_scale = 1.0
    seen_before: tuple = ()

    def __init__(self, train: SplitData, val: SplitData, device: str):
        self.train, self.val, self.device = train, val, device

    def wrap(self, model: JointEmbedding) -> torch.nn.Module:
        return model

    def parameters(self) -> list:
        return []

    def batch(self, idx: np.ndarray, epoch: int) -> torch.Tensor:
        return torch.from_numpy(self.train.features[idx]).to(self.device)

    def embed_val(self, model: JointEmbedding) -> torch.Tensor:
        return embed_images(model, self.val.features, self.device)

    def state(self) -> dict:
        return {}

    def load_state(self, ckpt: dict) -> None:
        pass

    def best(self, payload: dict, epoch: int, out: Path) -> dict:
        return payload
