"""Similarities and hinge losses against plain-Python loops over the paper's equations."""

import pytest
import torch

from fnemm.joint.losses import contrastive_loss, cosine_scores, hinge_loss, order_scores, scores
from fnemm.joint.model import l2_normalize


def _unit(n, d, seed, abs_=False):
    g = torch.Generator().manual_seed(seed)
    x = l2_normalize(torch.randn(n, d, generator=g, dtype=torch.float64))
    return x.abs() if abs_ else x


def brute_cos(i, c):
    return sum(float(a) * float(b) for a, b in zip(i, c))


def brute_order(i, c):
    # Eq. 3: S_OE(c, i) = -|| max(0, c - i) ||^2
    return -sum(max(0.0, float(cb) - float(ib)) ** 2 for ib, cb in zip(i, c))


def brute_loss(images, captions, sim, reduction, margin):
    n = len(images)
    s = [[sim(images[a], captions[b]) for b in range(n)] for a in range(n)]
    total = 0.0
    for k in range(n):   # image k against the other captions (Eq. 1/4, first sum)
        hinges = [max(0.0, margin - s[k][k] + s[k][j]) for j in range(n) if j != k]
        total += max(hinges) if reduction == "max" else sum(hinges)
    for k in range(n):   # caption k against the other images (second sum)
        hinges = [max(0.0, margin - s[k][k] + s[j][k]) for j in range(n) if j != k]
        total += max(hinges) if reduction == "max" else sum(hinges)
    return total


def test_cosine_scores_match_dot_products():
    im, ca = _unit(7, 5, 0), _unit(9, 5, 1)
    s = cosine_scores(im, ca)
    assert s.shape == (7, 9)
    for a in range(7):
        for b in range(9):
            assert s[a, b].item() == pytest.approx(brute_cos(im[a], ca[b]), abs=1e-12)


@pytest.mark.parametrize("block", [(1, 1), (4, 3), (8, 128), None])
@pytest.mark.parametrize("grad", [False, True])
def test_order_scores_match_eq3_whatever_the_tiling(block, grad):
    im, ca = _unit(6, 4, 2, abs_=True), _unit(11, 4, 3, abs_=True)
    s = order_scores(im.requires_grad_(grad), ca, block=block)
    assert s.shape == (6, 11)
    for a in range(6):
        for b in range(11):
            assert s[a, b].item() == pytest.approx(brute_order(im[a].detach(), ca[b]), abs=1e-12)


def test_order_score_is_zero_when_image_dominates_caption():
    caption = torch.tensor([[0.1, 0.2, 0.0]])
    image = torch.tensor([[0.5, 0.3, 0.1]])
    assert order_scores(image, caption).item() == 0.0
    # and only the exceeding coordinates count, squared
    assert order_scores(caption, image).item() == pytest.approx(-(0.4**2 + 0.1**2 + 0.1**2))


@pytest.mark.parametrize("similarity", ["cosine", "order"])
@pytest.mark.parametrize("reduction", ["sum", "max"])
@pytest.mark.parametrize("margin", [0.05, 0.2, 1.0])
def test_hinge_losses_match_brute_force(similarity, reduction, margin):
    im, ca = _unit(8, 6, 4, abs_=similarity == "order"), _unit(8, 6, 5, abs_=similarity == "order")
    sim = brute_cos if similarity == "cosine" else brute_order
    got = contrastive_loss(im, ca, similarity, reduction, margin).item()
    assert got == pytest.approx(brute_loss(im, ca, sim, reduction, margin), rel=1e-10, abs=1e-12)


def test_max_is_at_most_sum_and_both_vanish_for_separated_pairs():
    im = torch.eye(4, dtype=torch.float64)
    assert hinge_loss(cosine_scores(im, im), 0.2, "sum").item() == 0.0
    assert hinge_loss(cosine_scores(im, im), 0.2, "max").item() == 0.0
    s = cosine_scores(_unit(10, 3, 6), _unit(10, 3, 7))
    assert hinge_loss(s, 0.2, "max") <= hinge_loss(s, 0.2, "sum")


def test_loss_gradients_flow_to_both_sides():
    im = _unit(5, 4, 8).requires_grad_()
    ca = _unit(5, 4, 9, abs_=True).requires_grad_()
    contrastive_loss(im, ca, "order", "max", 0.05).backward()
    assert im.grad is not None and ca.grad is not None
    assert im.grad.abs().sum() > 0 and ca.grad.abs().sum() > 0


def test_unknown_names_are_rejected():
    x = _unit(3, 2, 0)
    with pytest.raises(ValueError, match="similarity"):
        scores(x, x, "euclid")
    with pytest.raises(ValueError, match="reduction"):
        hinge_loss(cosine_scores(x, x), 0.2, "mean")
