"""Training throughput of the flickr8k/FNE-MH preset on this machine.

One training step = image encoder + GRU text encoder + max-of-hinges loss,
backward, gradient clipping, Adam. Measured on batches shaped like Flickr8K
(12,416-d int8 FNE features, the real caption lengths and vocabulary size when
../shared/data/flickr8k is present), with a breakdown of where the time goes
and the projected time of one epoch (6,000 pairs) and of the preset's full run.

    .venv/bin/python bench/train_speed.py [--preset flickr8k/FNE-MH] [--steps 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fnemm.joint.presets import get_preset
from fnemm.joint.inputs import build_vocab
from fnemm.datasets import load_dataset
from fnemm.joint.losses import contrastive_loss
from fnemm.joint.model import JointEmbedding
from fnemm.joint.text import pad_batch

F8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def caption_batches(batch: int, steps: int, rng):
    """Token-id batches of real Flickr8K training captions (and its train+val
    vocabulary) when the bundled data is present, else of random ids with
    similar lengths."""
    if (F8K / "Flickr8k.token.txt").exists():
        ds = load_dataset(F8K)
        train = ds.split_indices("train")
        picks = rng.choice(train, size=(steps, batch))
        vocab = build_vocab(ds)
        vocab_size = len(vocab)
        encoded = [[vocab.encode(ds.captions[k][rng.integers(5)]) for k in row] for row in picks]
        source = "Flickr8K training captions"
    else:
        vocab_size, source = 8000, "random captions of 8-20 words"
        encoded = [[list(rng.integers(2, vocab_size, size=rng.integers(8, 21))) for _ in range(batch)]
                   for _ in range(steps)]
    return [pad_batch(rows) for rows in encoded], vocab_size, source


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="flickr8k/FNE-MH")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--feature-dim", type=int, default=12416)
    args = ap.parse_args()
    cfg = get_preset(args.preset)
    rng = np.random.default_rng(0)
    bs = cfg.batch_size
    batches, vocab_size, source = caption_batches(bs, args.steps + 2, rng)
    feats = torch.from_numpy(rng.integers(-1, 2, size=(args.steps + 2, bs, args.feature_dim), dtype=np.int8))
    torch.manual_seed(0)
    model = JointEmbedding(cfg.model, vocab_size, args.feature_dim).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.stages[0].lr)
    stage = cfg.stages[0]
    parts = {"image encoder": 0.0, "text encoder": 0.0, "loss": 0.0, "backward+clip+adam": 0.0}

    def step(k, timed):
        t0 = time.perf_counter()
        img = model.image(feats[k].to(args.device))
        sync(args.device)
        t1 = time.perf_counter()
        tokens, lengths = batches[k]
        cap = model.text(tokens.to(args.device), lengths)
        sync(args.device)
        t2 = time.perf_counter()
        loss = contrastive_loss(img, cap, cfg.model.similarity, stage.loss, stage.margin)
        sync(args.device)
        t3 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sync(args.device)
        t4 = time.perf_counter()
        if timed:
            for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[name] += dt

    for k in range(2):                       # warm-up (allocations, kernels)
        step(k, False)
    t0 = time.perf_counter()
    for k in range(2, args.steps + 2):
        step(k, True)
    total = time.perf_counter() - t0
    pairs_s = args.steps * bs / total
    epochs = max(s.max_epochs for s in cfg.stages) * len(cfg.stages)
    print(f"{args.preset}: embed {cfg.model.embed_dim}, word {cfg.model.word_dim}, vocab {vocab_size}, "
          f"features {args.feature_dim}, batch {bs}, {source}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"training step: {pairs_s:8.1f} pairs/s  ({1000 * total / args.steps:.0f} ms per batch of {bs})")
    for name, dt in parts.items():
        print(f"  {name:<20} {100 * dt / total:5.1f} %")
    epoch_s = 6000 / pairs_s
    print(f"projected: {epoch_s:.0f} s per Flickr8K epoch (6,000 pairs, without validation); "
          f"{epochs} epochs = {epochs * epoch_s / 3600:.1f} h")


if __name__ == "__main__":
    main()
