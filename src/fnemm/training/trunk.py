"""A CNN up to its baseline layer, as a trainable image encoder (fine-tuning, fnemm.training.finetune)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fnemm.features.cnn import TappedCNN
from fnemm.io.errors import FnemmError
from fnemm.joint.model import l2_normalize


class _Stop(Exception):
    def __init__(self, output: torch.Tensor):
        self.output = output


class Trunk(nn.Module):
    """A CNN up to its baseline layer: uint8 crops -> the pooled, L2-normalised baseline
    feature (a store's ``fc7`` row for one crop). The last ``blocks`` blocks before the
    baseline (``TappedCNN.groups['blocks']``: VGG16's conv blocks, fc6, fc7; MobileNetV2's
    and EfficientNet's inverted-residual blocks and head) train; everything else is
    frozen and stays in eval mode, batch-norm included unless ``train_bn``."""

    def __init__(self, cnn: TappedCNN, blocks: int, train_bn: bool = False):
        super().__init__()
        self.net = cnn.untap()
        self.preprocess, self.input_size, self.info = cnn.preprocess, cnn.input_size, dict(cnn.info)
        self.dim = cnn.baseline.channels
        label_to_module = {t.name: m for t, m in zip(cnn.taps, cnn.tap_modules)}
        self.baseline_module = label_to_module[cnn.baseline.name]
        order = self._execution_order()
        ends = [label_to_module[b] for b in cnn.groups["blocks"]]
        ends = [m for m in ends if order.index(m) <= order.index(self.baseline_module)]
        if not 1 <= blocks <= len(ends):
            raise FnemmError(f"--finetune-blocks {blocks}: {cnn.info.get('cnn')} has {len(ends)} blocks up to its "
                             f"baseline layer; choose 1 to {len(ends)}")
        first = order.index(ends[-blocks - 1]) + 1 if blocks < len(ends) else 0
        self.trained_modules = [m for m in order[first:order.index(self.baseline_module) + 1]
                                if any(True for _ in self.net.get_submodule(m).parameters(recurse=False))]
        trained = {f"{m}.{n}" for m in self.trained_modules for n, _ in self.net.get_submodule(m).named_parameters()}
        for name, p in self.net.named_parameters():
            p.requires_grad_(name in trained)
        self.blocks, self.train_bn = blocks, train_bn
        self.net.get_submodule(self.baseline_module).register_forward_hook(self._stop)
        self.train(False)

    def _execution_order(self) -> list[str]:
        """Every leaf module's name, in the order a forward pass first runs it."""
        seen: list[str] = []
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.append(n) if n not in seen else None)
                 for n, m in self.net.named_modules() if n and not list(m.children())]
        try:
            with torch.no_grad():
                self.net(torch.zeros(1, 3, self.input_size, self.input_size))
        finally:
            for h in hooks:
                h.remove()
        return seen

    @staticmethod
    def _stop(module, inputs, output):
        raise _Stop(output)             # nothing after the baseline layer is needed

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def trained_state(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.net.named_parameters() if p.requires_grad}
        bn = self._trained_bn_buffers() if self.train_bn else set()
        return {k: v.detach().clone() for k, v in self.net.state_dict().items() if k in names or k in bn}

    def _trained_bn_buffers(self) -> set[str]:
        out = set()
        for m in self.trained_modules:
            if isinstance(self.net.get_submodule(m), nn.modules.batchnorm._BatchNorm):
                out |= {f"{m}.{n}" for n, _ in self.net.get_submodule(m).named_buffers()}
        return out

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.trained_state()) - set(state)
        if missing:
            raise KeyError(f"trained CNN tensors missing: {sorted(missing)[:3]}")
        self.net.load_state_dict(state, strict=False)

    def train(self, mode: bool = True):
        super().train(False)            # frozen layers (and batch-norm) always in eval mode
        if mode and self.train_bn:
            for m in self.trained_modules:
                module = self.net.get_submodule(m)
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train(True)
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, dim) float32, L2-normalised."""
        try:
            self.net(self.preprocess(pixels))
        except _Stop as stop:
            out = stop.output
        else:
            raise FnemmError("the baseline layer did not run in the forward pass")
        pooled = out.float().mean((2, 3)) if out.dim() == 4 else out.float().flatten(1)
        return l2_normalize(pooled)

    @torch.no_grad()
    def features(self, crops_u8: np.ndarray, n_crops: int, device: str, batch: int = 64) -> np.ndarray:
        """(n_images, dim): each image's crops pooled and averaged, then L2-normalised, as
        extraction makes a store's fc7 row (``crops_u8``: (n_images * n_crops, H, W, 3))."""
        was = self.net.training
        self.train(False)
        rows = []
        for s in range(0, len(crops_u8), batch):
            x = torch.from_numpy(np.ascontiguousarray(crops_u8[s:s + batch])).to(device)
            try:
                self.net(self.preprocess(x))
            except _Stop as stop:
                out = stop.output.float()
            rows.append((out.mean((2, 3)) if out.dim() == 4 else out.flatten(1)).cpu())
        self.train(was)
        pooled = torch.cat(rows).view(-1, n_crops, self.dim).mean(1)
        return l2_normalize(pooled).numpy()
