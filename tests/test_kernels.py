"""The compiled order-similarity kernel against the torch definition (Eq. 3)."""

import pytest
import torch

from fnemm import kernels
from fnemm.losses import order_scores

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
    with torch.no_grad():       # order_scores without the kernel: the torch tiles, same values
        plain = order_scores(images, captions)
    assert torch.allclose(plain.double(), _reference(images, captions), rtol=1e-5, atol=1e-6)


def test_evaluation_path_uses_the_kernel_above_the_size_threshold(monkeypatch):
    import fnemm.losses as losses
    calls = []
    real = kernels.order_scores
    monkeypatch.setattr(kernels, "order_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    images, captions = torch.rand(300, 16, generator=g), torch.rand(1500, 16, generator=g)
    assert 300 * 1500 >= losses.KERNEL_MIN_PAIRS
    with torch.no_grad():
        got = order_scores(images, captions)
    assert calls and torch.allclose(got.double(), _reference(images, captions), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("noise,seed", [(0.3, 0), (1.0, 1)])
def test_banded_order_ranks_equal_the_float64_matrix_ranks(noise, seed):
    """float32 kernel scores, float64 re-scoring of the band: exactly the float64
    matrix's ranks, with duplicated images and captions (exact ties), an image
    without captions and one with seven."""
    from fnemm.metrics import banded_order_ranks, i2t_ranks, t2i_ranks
    g = torch.Generator().manual_seed(seed)
    n, d = 200, 48
    img = torch.rand(n, d, generator=g)
    img[9] = img[4]
    owner = torch.arange(n).repeat_interleave(5)
    owner = torch.cat([owner[owner != 13], torch.tensor([6, 6])])
    cap = (img[owner] + noise * torch.randn(len(owner), d, generator=g)).abs()
    cap[30] = cap[31]
    got = banded_order_ranks(img, cap, owner, block=64)
    ref = _reference(img, cap)
    assert got[0].tolist() == i2t_ranks(ref, owner).tolist()
    assert got[1].tolist() == t2i_ranks(ref, owner).tolist()


def test_a_collapsed_order_model_ranks_pessimistically():
    from fnemm.metrics import banded_order_ranks
    img, cap = torch.full((40, 8), 0.5), torch.full((200, 8), 0.5)
    owner = torch.arange(40).repeat_interleave(5)
    i2t, t2i = banded_order_ranks(img, cap, owner)
    assert t2i.unique().tolist() == [40] and i2t.unique().tolist() == [196]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bands_count_and_list_like_torch_even_past_the_first_buffer(dtype):
    """One pass of fnemm_bands against its definition in torch, on a block whose band
    (every score of half the rows sits between its cuts) outgrows the first buffer."""
    g = torch.Generator().manual_seed(5)
    n_all, nr, nc, r0 = 400, 300, 100, 60
    scores = torch.randn(nr, nc, generator=g).to(dtype)
    scores[::2] = 0.0
    low_c, high_c = -0.5 * torch.rand(nc, generator=g), 0.5 * torch.rand(nc, generator=g)
    low_r, high_r = -torch.rand(n_all, generator=g), torch.rand(n_all, generator=g)
    low_r[r0 + 1] = high_r[r0 + 1] = -torch.inf        # a row every score is above
    above_c, above_r = torch.ones(nc, dtype=torch.long), torch.zeros(n_all, dtype=torch.long)
    band_c, band_r = kernels.bands(scores, r0, low_c, high_c, low_r, high_r, above_c, above_r, threads=2)
    s = scores.float()
    rows = torch.arange(nr)[:, None] + r0
    assert above_c.tolist() == (1 + (s > high_c).sum(0)).tolist()
    assert above_r[r0:r0 + nr].tolist() == (s > high_r[rows]).sum(1).tolist()
    assert above_r[:r0].eq(0).all() and above_r[r0 + nr:].eq(0).all()
    in_c = ((s >= low_c) & (s <= high_c)).nonzero()
    in_r = ((s >= low_r[rows]) & (s <= high_r[rows])).nonzero()
    assert len(in_c) > 4096
    assert band_c.tolist() == (in_c + torch.tensor([r0, 0])).tolist()
    assert band_r.tolist() == (in_r + torch.tensor([r0, 0])).tolist()


def test_banded_order_ranks_are_exact_where_float32_rounding_breaks_ties():
    """Scores that tie exactly (float64 sums of dyadic values are exact) but not in
    float32 (1,024 terms of 20 bits each overflow its 24-bit significand: errors up to
    8u here, past the cuts' own float32 margin): every image has a coordinate-permuted
    twin and captions are constant vectors, so each caption's positive score ties with
    its image's twin. Only the error band gets these right."""
    from fnemm.metrics import banded_order_ranks, i2t_ranks, t2i_ranks
    g = torch.Generator().manual_seed(7)
    half, d = 30, 1024
    base = torch.randint(0, 1024, (half, d), generator=g).float() / 1024
    twins = torch.stack([row[torch.randperm(d, generator=g)] for row in base])
    img = torch.cat([base, twins])
    owner = torch.arange(2 * half).repeat_interleave(4)
    # above every image coordinate, so that all 1,024 terms count
    cap = (1 + torch.randint(0, 64, (len(owner), 1), generator=g).float() / 64).expand(-1, d).contiguous()
    ref = _reference(img, cap)
    assert (ref[:half] == ref[half:]).all()                                # exact ties in float64
    approx = kernels.order_scores(img, cap)
    assert (approx[:half] != approx[half:]).any()                          # not in float32
    got = banded_order_ranks(img, cap, owner, block=16)
    assert got[0].tolist() == i2t_ranks(ref, owner).tolist()
    assert got[1].tolist() == t2i_ranks(ref, owner).tolist()


def test_banded_order_ranks_do_not_count_a_score_float32_lifts_past_its_threshold():
    """Each image has a rival: the same vector with one coordinate (near the captions'
    values) lowered by 2^-13, whose exact score against every (constant) caption is a
    hair below the image's own (at most ~2u relative), while float32 sums of 4,096
    terms err by up to ~25u. Without the error band such a rival is counted above."""
    from fnemm.metrics import banded_order_ranks, i2t_ranks, t2i_ranks
    g = torch.Generator().manual_seed(8)
    half, d = 20, 4096
    base = torch.randint(1, 8192, (half, d), generator=g).float() / 8192
    base[:, 0] = 1 - 2.0 ** -12
    rival = base.clone()
    rival[:, 0] -= 2.0 ** -13
    img = torch.cat([base, rival])
    owner = torch.arange(half).repeat_interleave(6)
    cap = (1 + torch.randint(0, 64, (len(owner), 1), generator=g).float() / 64).expand(-1, d).contiguous()
    ref = torch.stack([_reference(row[None], cap)[0] for row in img])   # exact: dyadic sums in float64
    assert (ref[half:] < ref[:half]).all()                                 # rivals are below, exactly
    approx = kernels.order_scores(img, cap).double()
    assert (approx[half:] > ref[:half] * (1 - 2 * 2.0 ** -24)).any()      # float32 lifts some past the cut
    got = banded_order_ranks(img, cap, owner, block=16)
    assert got[0].tolist() == i2t_ranks(ref, owner).tolist()
    assert got[1].tolist() == t2i_ranks(ref, owner).tolist()
