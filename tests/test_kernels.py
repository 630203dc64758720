"""The compiled order-similarity kernel against the torch definition (Eq. 3)."""

import pytest
import torch

from fnemm.eval import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler to build fnemm's kernel")


def _reference(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    diff = (captions.double().unsqueeze(0) - images.double().unsqueeze(1)).clamp(min=0)
    return -(diff * diff).sum(-1)


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (9, 131, 7), (37, 517, 64), (5, 4, 1024)])
def test_kernel_matches_eq3_in_float64(n, m, d):
    g = torch.Generator().manual_seed(n * m + d)
    images, captions = torch.rand(n, d, generator=g), torch.rand(m, d, generator=g)
    got = kernels.order_scores(images, captions)
    ref = _reference(images, captions)
    assert got.dtype == torch.float32 and got.shape == (n, m)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_threads_and_views_do_not_change_a_bit():
    g = torch.Generator().manual_seed(1)
    images, captions = torch.rand(64, 40, generator=g), torch.rand(300, 40, generator=g)
    one = kernels.order_scores(images, captions, threads=1)
    assert torch.equal(one, kernels.order_scores(images, captions, threads=3))
    # A transposed (non-contiguous) view is read as its values, not its storage.
    assert torch.equal(one, kernels.order_scores(images, captions.t().contiguous().t()))


def test_what_the_kernel_does_not_take_falls_back_to_torch(monkeypatch):
    g = torch.Generator().manual_seed(2)
    images, captions = torch.rand(300, 8, generator=g), torch.rand(400, 8, generator=g)
    assert kernels.order_scores(images.double(), captions.double()) is None
    assert kernels.order_scores(images.requires_grad_(), captions) is None
    monkeypatch.setenv("FNEMM_KERNELS", "0")
    assert not kernels.available()
    images = images.detach()
    from fnemm.eval.metrics import score_tile
    with torch.no_grad():       # evaluation without the kernel: the torch tiles, same values
        plain = score_tile(images, captions, "order")
    assert torch.allclose(plain.double(), _reference(images, captions), rtol=1e-5, atol=1e-6)
