"""The joint embedding: a GRU caption encoder and a linear image encoder.

Both sides end L2-normalised (so cosine similarity is a dot product) and, for
the order-embedding variants, take the absolute value (Vendrov et al.).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from fnemm.joint.config import ModelConfig


def l2_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


class LayerNormGRU(nn.Module):
    """A one-layer GRU whose gate pre-activations are layer-normalised at every
    step (Ba, Kiros & Hinton 2016, Sec. 3.1 applied to the GRU): the input and
    recurrent projections are normalised separately, each with its own gain and
    bias. Slower than cuDNN/MKL's fused GRU, since it loops over time in Python.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.x2h = nn.Linear(input_size, 3 * hidden_size, bias=False)
        self.h2h = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.ln_x = nn.LayerNorm(3 * hidden_size)
        self.ln_h = nn.LayerNorm(3 * hidden_size)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Final hidden state at each sequence's true length; x is (batch, time, in)."""
        batch, steps, _ = x.shape
        h = x.new_zeros(batch, self.hidden_size)
        gx_all = self.ln_x(self.x2h(x))                     # all steps at once
        for t in range(steps):
            gx = gx_all[:, t]
            gh = self.ln_h(self.h2h(h))
            rx, zx, nx = gx.chunk(3, dim=1)
            rh, zh, nh = gh.chunk(3, dim=1)
            r = torch.sigmoid(rx + rh)
            z = torch.sigmoid(zx + zh)
            n = torch.tanh(nx + r * nh)
            h_new = (1 - z) * n + z * h
            # Sequences already finished keep their last state (padding is ignored).
            alive = (lengths > t).unsqueeze(1).to(x.dtype)
            h = alive * h_new + (1 - alive) * h
        return h


def gru_last_states(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``nn.GRU``'s final hidden states of a padded batch (batch, time, in), computed
    as its CPU kernel does (input projections of all steps in one product, then the
    recurrence step by step over the shrinking packed batch), but with a backward that
    is linear in the sequence length: ATen's packed GRU slices each step out of the
    projected input, and the backward of every slice zero-fills and adds a tensor the
    size of the whole packed input (a third of a training step's time at the demo's
    sizes). Same operations in the same order, so the same floats (tests/test_model.py)."""
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    steps = F.linear(packed.data, gru.weight_ih_l0, gru.bias_ih_l0).split(packed.batch_sizes.tolist())
    h = x.new_zeros(steps[0].shape[0], gru.hidden_size)
    finished = []                          # states of the sequences that ended, shortest last
    for gx in steps:
        alive = gx.shape[0]
        if alive < h.shape[0]:            # the packed batch is sorted longest first
            finished.append(h[alive:])
            h = h[:alive]
        gh = F.linear(h, gru.weight_hh_l0, gru.bias_hh_l0)
        xr, xz, xn = gx.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = n + z * (h - n)
    finished.append(h)
    return torch.cat(finished[::-1])[packed.unsorted_indices]


def authors_gru_init_(weight_ih: torch.Tensor, weight_hh: torch.Tensor, *biases: torch.Tensor) -> None:
    """The paper's Theano GRU initialisation (``code/layers.py`` param_init_gru, from Kiros's
    visual-semantic-embedding), on torch's layout (rows: the r, z, n gates' blocks): each
    input block uniform in [-0.1, 0.1], orthogonal instead when it is square (their
    ``norm_weight``); each recurrent block orthogonal (``ortho_weight``); biases zero.
    torch's own is uniform in +-1/sqrt(hidden) for all of them (+-0.031 at 1,024 units):
    its recurrent blocks' singular values spread from 0 to about 1.15 (RMS 0.58), where
    theirs are all 1."""
    with torch.no_grad():
        for block in weight_ih.chunk(3, dim=0):
            if block.shape[0] == block.shape[1]:
                nn.init.orthogonal_(block)
            else:
                nn.init.uniform_(block, -0.1, 0.1)
        for block in weight_hh.chunk(3, dim=0):
            nn.init.orthogonal_(block)
        for b in biases:
            nn.init.zeros_(b)


class TextEncoder(nn.Module):
    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int,
                 use_abs: bool = False, layer_norm: bool = False, init: str = "torch"):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.use_abs = use_abs
        self.layer_norm = layer_norm
        if layer_norm:
            self.rnn = LayerNormGRU(word_dim, embed_dim)
        else:
            self.rnn = nn.GRU(word_dim, embed_dim, batch_first=True)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        if init == "authors":
            if layer_norm:
                authors_gru_init_(self.rnn.x2h.weight, self.rnn.h2h.weight)
            else:
                authors_gru_init_(self.rnn.weight_ih_l0, self.rnn.weight_hh_l0,
                                  self.rnn.bias_ih_l0, self.rnn.bias_hh_l0)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.layer_norm:
            h = self.rnn(x, lengths.to(x.device))
        elif torch.is_grad_enabled() and x.device.type == "cpu":
            h = gru_last_states(self.rnn, x, lengths)     # training: the same floats, a faster backward
        else:                                             # cuDNN on a GPU; inference
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            _, h_n = self.rnn(packed)                     # (1, batch, hidden), original order
            h = h_n[0]
        h = l2_normalize(h)
        return h.abs() if self.use_abs else h


class ImageEncoder(nn.Module):
    """Linear map of the image features into the joint space (input dropout while
    training, when asked for): bias-free as the paper writes it, or with the bias the
    authors' code has (``ff_image``: Xavier weights, a zero bias)."""

    def __init__(self, feature_dim: int, embed_dim: int, use_abs: bool = False, dropout: float = 0.0,
                 bias: bool = False):
        super().__init__()
        self.fc = nn.Linear(feature_dim, embed_dim, bias=bias)
        self.use_abs = use_abs
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        nn.init.xavier_uniform_(self.fc.weight)
        if bias:
            nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        v = l2_normalize(self.fc(self.dropout(features.float())))
        return v.abs() if self.use_abs else v


class JointEmbedding(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int, feature_dim: int):
        super().__init__()
        self.config = config
        self.feature_dim = feature_dim
        self.vocab_size = vocab_size
        self.image = ImageEncoder(feature_dim, config.embed_dim, config.use_abs, config.image_dropout,
                                  config.image_bias)
        self.text = TextEncoder(vocab_size, config.word_dim, config.embed_dim,
                                config.use_abs, config.layer_norm, config.init)

    def forward(self, features, tokens, lengths):
        return self.image(features), self.text(tokens, lengths)
