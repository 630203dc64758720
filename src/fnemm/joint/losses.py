"""Similarities and hinge losses of the joint embedding (paper Eqs. 1-4).

Pure functions on tensors. Every score matrix is laid out ``scores[i, c]``:
rows are images, columns are captions, both already embedded (unit norm).
"""

from __future__ import annotations

import torch

SIMILARITIES = ("cosine", "order")
REDUCTIONS = ("sum", "max")
PLATEAU_SHARE = 0.9        # an epoch whose mean batch loss is above this share of plateau_loss is on the plateau


def cosine_scores(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """S_COS(c, i) = c . i for unit vectors (Eq. 2): an (n_images, n_captions) matrix."""
    return images @ captions.t()


def order_scores(images: torch.Tensor, captions: torch.Tensor,
                 block: tuple[int, int] | None = None) -> torch.Tensor:
    """S_OE(c, i) = -||max(0, c - i)||^2 (Eq. 3): an (n_images, n_captions) matrix.

    A caption is a more general concept than its image, so the penalty is only for
    caption coordinates that exceed the image's. There is no matrix-product form,
    so the (images, captions, dim) differences are built explicitly:
    - with gradients (a training batch), in one piece;
    - without (evaluation), in ``block`` = (images, captions) tiles small enough to
      stay in cache on a CPU and updated in place: much faster than whole rows, and
      memory stays bounded (evaluation on a CPU uses the compiled kernel of
      fnemm.eval.kernels instead where it can be built).
    """
    if torch.is_grad_enabled() and (images.requires_grad or captions.requires_grad):
        diff = (captions.unsqueeze(0) - images.unsqueeze(1)).clamp(min=0)
        return -(diff * diff).sum(-1)
    if block is None:
        block = (64, 2048) if images.is_cuda else (8, 128)
    bi, bc = block
    out = images.new_empty(images.shape[0], captions.shape[0])
    with torch.no_grad():
        for a in range(0, images.shape[0], bi):
            tile_images = images[a:a + bi].unsqueeze(1)
            for b in range(0, captions.shape[0], bc):
                diff = (captions[b:b + bc].unsqueeze(0) - tile_images).clamp_(min=0)
                torch.sum(diff.mul_(diff), dim=-1, out=out[a:a + bi, b:b + bc])
        out.neg_()
    return out


def scores(images: torch.Tensor, captions: torch.Tensor, similarity: str) -> torch.Tensor:
    """The score matrix of ``similarity`` ('cosine' or 'order')."""
    if similarity == "cosine":
        return cosine_scores(images, captions)
    if similarity == "order":
        return order_scores(images, captions)
    raise ValueError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")


def hinge_loss(score_matrix: torch.Tensor, margin: float, reduction: str,
               pairs: slice | None = None) -> torch.Tensor:
    """Contrastive hinge loss over the in-batch negatives, both directions.

    ``score_matrix[k, k]`` is the positive pair k; every other entry of row k is a
    negative caption for image k (annotation) and every other entry of column k a
    negative image for caption k (retrieval).

    reduction='sum' is L_S (Eq. 1): the hinges of all negatives are added.
    reduction='max' is L_M (Eq. 4, VSE++): only the hardest negative counts.
    Both are summed over the batch, as in the paper; with ``pairs``, over those pairs
    only (their rows and columns: one process's share of a distributed batch).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    n = score_matrix.shape[0]
    positive = score_matrix.diagonal()
    # cost_caption[i, c]: caption c ranked against image i's true caption.
    cost_caption = (margin + score_matrix - positive.unsqueeze(1)).clamp(min=0)
    # cost_image[i, c]: image i ranked against caption c's true image.
    cost_image = (margin + score_matrix - positive.unsqueeze(0)).clamp(min=0)
    eye = torch.eye(n, dtype=torch.bool, device=score_matrix.device)
    cost_caption = cost_caption.masked_fill(eye, 0)
    cost_image = cost_image.masked_fill(eye, 0)
    if pairs is not None:
        cost_caption, cost_image = cost_caption[pairs], cost_image[:, pairs]
    if reduction == "max":
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_caption.sum() + cost_image.sum()


def plateau_loss(reduction: str, margin: float, batch: int) -> float:
    """The batch loss when every pair scores alike (all embeddings equal: each hinge is the
    margin). Max-of-hinges training starts just under it and can stay there for tens of
    epochs while no pair beats its hardest negative, validation rsum creeping meanwhile."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    return 2 * margin * batch * (1 if reduction == "max" else batch - 1)


def on_plateau(loss: float, reduction: str, margin: float, batch: int) -> bool:
    """An epoch's mean batch ``loss`` is on the plateau: at least ``PLATEAU_SHARE`` of
    :func:`plateau_loss` (what patience does not count, and what reports count)."""
    return loss >= PLATEAU_SHARE * plateau_loss(reduction, margin, batch)


def contrastive_loss(
    images: torch.Tensor,
    captions: torch.Tensor,
    similarity: str,
    reduction: str,
    margin: float,
) -> torch.Tensor:
    """The loss of one batch of matching (image, caption) embedding pairs."""
    return hinge_loss(scores(images, captions, similarity), margin, reduction)
