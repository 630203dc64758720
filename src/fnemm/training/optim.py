"""The optimiser's side of a training step: gradient clipping (global, or per tensor as the
authors' optimiser did) and Adam with torch's fused kernel where it applies."""

from __future__ import annotations

import torch


def clip_gradients(params, max_norm: float, mode: str) -> None:
    """'global': scale all gradients by max_norm / their joint norm when it is larger
    (VSE++); 'per-tensor': the same for each parameter tensor on its own (the authors'
    optimiser). The scale is max_norm / (norm + 1e-6), as torch's clip_grad_norm_."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    grads = [p.grad for p in params]
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


def adam(cls, params, lr: float) -> torch.optim.Optimizer:
    """Adam's fused kernel where torch has one for these tensors: the same update, ~5x
    faster on a CPU for the FNE's large image map (6 vs 35 ms a step at 18,057 x 512)."""
    params = list(params)
    try:
        return cls(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, lr=lr)
