"""The joint embedding against references: the layer-normalised GRU step by step in
float64 numpy, the training GRU against nn.GRU, padded batches against captions run alone,
embed_captions' order."""

import numpy as np
import pytest
import torch

from fnemm.joint.config import ModelConfig
from fnemm.joint.inputs import embed_captions, embed_images
from fnemm.joint.model import JointEmbedding, LayerNormGRU, TextEncoder, gru_last_states
from fnemm.joint.text import pad_batch


def _ln(x, gain, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gain + bias


def reference_ln_gru(gru: LayerNormGRU, x: np.ndarray, length: int) -> np.ndarray:
    """One sequence, step by step (Ba et al. 2016 applied to the GRU), in float64."""
    p = {k: v.detach().double().numpy() for k, v in gru.state_dict().items()}
    h = np.zeros(gru.hidden_size)
    for t in range(length):
        gx = _ln(p["x2h.weight"] @ x[t], p["ln_x.weight"], p["ln_x.bias"])
        gh = _ln(p["h2h.weight"] @ h, p["ln_h.weight"], p["ln_h.bias"])
        rx, zx, nx = np.split(gx, 3)
        rh, zh, nh = np.split(gh, 3)
        r = 1 / (1 + np.exp(-(rx + rh)))
        z = 1 / (1 + np.exp(-(zx + zh)))
        n = np.tanh(nx + r * nh)
        h = (1 - z) * n + z * h
    return h


def test_layer_norm_gru_matches_a_step_by_step_reference():
    torch.manual_seed(0)
    gru = LayerNormGRU(5, 7)
    with torch.no_grad():                      # non-trivial gains and biases
        for ln in (gru.ln_x, gru.ln_h):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.3, 0.3)
    x = torch.randn(3, 6, 5)
    lengths = torch.tensor([6, 2, 4])
    out = gru(x, lengths).detach().double().numpy()
    for b in range(3):
        np.testing.assert_allclose(out[b], reference_ln_gru(gru, x[b].double().numpy(), int(lengths[b])),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_a_padded_batch_equals_each_caption_alone(layer_norm):
    torch.manual_seed(1)
    model = JointEmbedding(ModelConfig(word_dim=6, embed_dim=8, layer_norm=layer_norm), vocab_size=20,
                           feature_dim=4).eval()
    captions = [[3, 4, 5, 6, 7], [8], [9, 10, 11], [2, 3]]
    tokens, lengths = pad_batch(captions)
    assert tokens.shape == (4, 5) and lengths.tolist() == [5, 1, 3, 2]
    with torch.no_grad():
        batch = model.text(tokens, lengths)
        alone = torch.cat([model.text(torch.tensor([c]), torch.tensor([len(c)])) for c in captions])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch.norm(dim=1), torch.ones(4))


def test_embed_captions_keeps_input_order_and_batches_do_not_matter():
    torch.manual_seed(2)
    model = JointEmbedding(ModelConfig(word_dim=6, embed_dim=8), vocab_size=30, feature_dim=4)
    rng = np.random.default_rng(0)
    captions = [list(rng.integers(2, 30, size=rng.integers(1, 12))) for _ in range(50)]
    whole = embed_captions(model, captions, "cpu")
    small = embed_captions(model, captions, "cpu", batch=7)       # length-sorted in other groups
    torch.testing.assert_close(whole, small, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for k in (0, 17, 49):
            alone = model.text(torch.tensor([captions[k]]), torch.tensor([len(captions[k])]))[0]
            torch.testing.assert_close(whole[k], alone, rtol=1e-5, atol=1e-6)


def test_mapped_embeddings_equal_the_in_memory_ones_and_leave_no_file(tmp_path, monkeypatch):
    """``mapped=True`` (evaluation on a CPU): the same numbers in a scratch file's pages,
    and the file is gone from the temporary folder while the array is still in use."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)            # re-read $TMPDIR
    torch.manual_seed(3)
    model = JointEmbedding(ModelConfig(word_dim=6, embed_dim=8), vocab_size=30, feature_dim=4)
    rng = np.random.default_rng(1)
    captions = [list(rng.integers(2, 30, size=rng.integers(1, 9))) for _ in range(23)]
    feats = rng.normal(size=(11, 4)).astype(np.float32)
    cap, img = embed_captions(model, captions, "cpu", batch=5, mapped=True), embed_images(model, feats, "cpu", 4, True)
    assert list(tmp_path.iterdir()) == []
    torch.testing.assert_close(cap, embed_captions(model, captions, "cpu", batch=5), rtol=0, atol=0)
    torch.testing.assert_close(img, embed_images(model, feats, "cpu", 4), rtol=0, atol=0)
    assert embed_images(model, feats[:0], "cpu", mapped=True).shape == (0, 8)


@pytest.mark.parametrize("use_abs", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_image_encoder_is_a_linear_map_then_l2(use_abs, bias):
    """Bias-free by default (the paper's equation); with image_bias the authors' ff_image:
    a zero bias at the start, trained like the weights."""
    torch.manual_seed(3)
    model = JointEmbedding(ModelConfig(word_dim=6, embed_dim=8, use_abs=use_abs, image_bias=bias),
                           vocab_size=10, feature_dim=5)
    if bias:
        assert torch.equal(model.image.fc.bias, torch.zeros(8))
        with torch.no_grad():
            model.image.fc.bias.copy_(torch.linspace(-1, 1, 8))
    else:
        assert model.image.fc.bias is None
    feats = np.random.default_rng(1).integers(-1, 2, size=(9, 5)).astype(np.int8)    # FNE codes
    got = embed_images(model, feats, "cpu", batch=4).numpy()
    w = model.image.fc.weight.detach().double().numpy()
    ref = feats.astype(np.float64) @ w.T + (np.linspace(-1, 1, 8) if bias else 0)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(got, np.abs(ref) if use_abs else ref, rtol=1e-5, atol=1e-6)
    if bias:
        model.image(torch.ones(3, 5)).sum().backward()
        assert model.image.fc.bias.grad is not None and model.image.fc.bias.grad.abs().sum() > 0


def _gru_blocks(enc: TextEncoder):
    rnn = enc.rnn
    w_ih, w_hh = (rnn.x2h.weight, rnn.h2h.weight) if enc.layer_norm else (rnn.weight_ih_l0, rnn.weight_hh_l0)
    return w_ih.detach().double().chunk(3), w_hh.detach().double().chunk(3)


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("word_dim", [40, 32])
def test_authors_init_is_the_theano_codes(layer_norm, word_dim):
    """init='authors' is code/layers.py's param_init_gru: every recurrent gate block
    orthogonal, every input block uniform in [-0.1, 0.1] (orthogonal when square: their
    norm_weight), zero biases; torch's default is neither."""
    eye = torch.eye(32, dtype=torch.float64)
    torch.manual_seed(0)
    enc = TextEncoder(50, word_dim, 32, layer_norm=layer_norm, init="authors")
    ih, hh = _gru_blocks(enc)
    for block in hh:
        torch.testing.assert_close(block @ block.T, eye, atol=1e-5, rtol=0)
    for block in ih:
        if word_dim == 32:
            torch.testing.assert_close(block @ block.T, eye, atol=1e-5, rtol=0)
        else:                                       # 1,280 draws of U(-0.1, 0.1): std 0.0577
            assert block.abs().max() <= 0.1 and block.std().item() == pytest.approx(0.1 / 3 ** 0.5, rel=0.08)
    if not layer_norm:
        assert not enc.rnn.bias_ih_l0.any() and not enc.rnn.bias_hh_l0.any()
    assert enc.embed.weight.abs().max() <= 0.1        # the word embedding: U(-0.1, 0.1) either way

    torch.manual_seed(0)
    ih, hh = _gru_blocks(TextEncoder(50, word_dim, 32, layer_norm=layer_norm))
    for block in hh + ih:                             # torch's U(-1/sqrt(32), 1/sqrt(32)): not orthogonal
        assert (block @ block.T - eye).abs().max() > 0.3
    # the model builds the text side from the config's init
    model = JointEmbedding(ModelConfig(word_dim=word_dim, embed_dim=32, layer_norm=layer_norm, init="authors"),
                           vocab_size=50, feature_dim=5)
    for block in _gru_blocks(model.text)[1]:
        torch.testing.assert_close(block @ block.T, eye, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_gru_last_states_matches_the_packed_nn_gru_with_gradients(dtype, tol):
    """The training path's GRU (fnemm.joint.model.gru_last_states) against nn.GRU on a
    packed batch: final states and every gradient, unsorted lengths with ties and a
    one-word caption. (In float32 they are bit-equal on the machines measured; the
    tolerance leaves room for a BLAS that blocks differently.)"""
    torch.manual_seed(0)
    gru = torch.nn.GRU(5, 7, batch_first=True).to(dtype)
    lengths = torch.tensor([3, 6, 1, 6, 4])
    x = torch.randn(5, 6, 5, dtype=dtype)
    weight = torch.randn(5, 7, dtype=dtype)        # a loss that weighs every output differently
    results = []
    for run in ("reference", "ours"):
        gru.zero_grad()
        xi = x.clone().requires_grad_()
        if run == "reference":
            packed = torch.nn.utils.rnn.pack_padded_sequence(xi, lengths, batch_first=True, enforce_sorted=False)
            h = gru(packed)[1][0]
        else:
            h = gru_last_states(gru, xi, lengths)
        (h * weight).sum().backward()
        results.append([h.detach(), xi.grad, *(p.grad.clone() for p in gru.parameters())])
    for ref, ours in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


def test_text_encoder_trains_through_gru_last_states_and_embeds_as_before(monkeypatch):
    """With gradients on a CPU the text encoder takes gru_last_states; without, nn.GRU:
    the same embedding either way."""
    from fnemm.joint import model as model_module
    calls = []
    monkeypatch.setattr(model_module, "gru_last_states", lambda *a: calls.append(1) or gru_last_states(*a))
    torch.manual_seed(0)
    text = TextEncoder(20, 6, 8)
    tokens = torch.randint(2, 20, (4, 5))
    lengths = torch.tensor([5, 2, 5, 3])
    trained = text(tokens, lengths)
    assert trained.requires_grad and len(calls) == 1
    with torch.no_grad():
        inferred = text(tokens, lengths)
    assert len(calls) == 1                         # inference: nn.GRU's own path
    torch.testing.assert_close(trained.detach(), inferred, rtol=1e-6, atol=1e-7)


def test_init_spread_tool_measures_the_mean_pairwise_cosine(synth, capsys):
    """tools/init_spread.py (README "Fidelity"): its Gram-sum mean cosine against the
    pairwise loop, and a run on a small dataset printing both initialisations."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "tools" / "init_spread.py"
    spec = importlib.util.spec_from_file_location("init_spread", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    e = torch.nn.functional.normalize(torch.randn(37, 6, dtype=torch.float64) + 0.5, dim=1)
    pairs = [float(e[i] @ e[j]) for i in range(37) for j in range(37) if i != j]
    assert tool.mean_pairwise_cosine(e) == pytest.approx(np.mean(pairs), rel=1e-9)
    jsonl, _, _ = synth
    tool.main(["--dataset", str(jsonl), "--images", "6", "--seeds", "2", "--presets", "demo/FC7-MH"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| demo/FC7-MH")]
    assert [r.split("|")[3].strip() for r in rows] == ["torch", "authors"]
    assert all(-1 <= float(r.split("|")[4].split("(")[0]) <= 1 for r in rows)
