"""Training throughput of a preset on this machine, and where a step spends its time.

One training step = image encoder + GRU text encoder + max-of-hinges loss,
backward, gradient clipping, Adam. Measured on batches shaped like Flickr8K (int8
FNE codes of --feature-dim features, the real caption lengths and vocabulary size when
../shared/data/flickr8k is present); then each part alone in the same process (the
text side, the image map, the update), as a share of the whole step, and the projected
time of one Flickr8K epoch (6,000 pairs). On a CPU, also the text side through nn.GRU's
packed path (the reference) against fnemm's training path (gru_last_states, the same
floats): their ratio, measured alternately in this process.

    .venv/bin/python bench/train_speed.py [--preset flickr8k/FNE-MH] [--feature-dim 17056] [--steps 10]
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
from fnemm.joint.model import JointEmbedding, gru_last_states
from fnemm.joint.text import pad_batch
from torch.nn.utils.rnn import pack_padded_sequence

from machine import cpu_features        # bench/ is this script's folder, on sys.path

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
    ap.add_argument("--feature-dim", type=int, default=17056,
                    help="17,056: MobileNetV2's FNE; 21,008: EfficientNet-Lite0's; 12,416: VGG16's; 1,280: a baseline")
    ap.add_argument("--float-features", action="store_true", help="float32 features (late-center-layer) "
                                                                  "instead of the FNE's int8 codes")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from fnemm.training.optim import adam, clip_gradients
    cfg = get_preset(args.preset)
    rng = np.random.default_rng(0)
    bs = cfg.batch_size
    batches, vocab_size, source = caption_batches(bs, args.steps + 2, rng)
    codes = rng.integers(-1, 2, size=(args.steps + 2, bs, args.feature_dim), dtype=np.int8)
    feats = torch.from_numpy(codes.astype(np.float32) if args.float_features else codes)
    torch.manual_seed(0)
    model = JointEmbedding(cfg.model, vocab_size, args.feature_dim).to(args.device)
    opt = adam(torch.optim.Adam, model.parameters(), cfg.stages[0].lr)
    stage = cfg.stages[0]

    def full_step(k):
        tokens, lengths = batches[k]
        img, cap = model(feats[k].to(args.device), tokens.to(args.device), lengths)
        loss = contrastive_loss(img, cap, cfg.model.similarity, stage.loss, stage.margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(model.parameters(), cfg.grad_clip, cfg.grad_clip_mode)
        opt.step()
        sync(args.device)

    def image_side(k):                 # the image map: forward and backward
        model.image(feats[k].to(args.device)).sum().backward()
        sync(args.device)

    def text_side(k):                  # word embeddings + GRU: forward and backward
        tokens, lengths = batches[k]
        model.text(tokens.to(args.device), lengths).sum().backward()
        sync(args.device)

    def update(k):                     # gradient clipping and Adam over every parameter
        clip_gradients(model.parameters(), cfg.grad_clip, cfg.grad_clip_mode)
        opt.step()
        sync(args.device)

    def timed(fn) -> float:
        for k in range(2):             # warm-up (allocations, kernels)
            fn(k)
        t0 = time.perf_counter()
        for k in range(2, args.steps + 2):
            fn(k)
        return (time.perf_counter() - t0) / args.steps

    def gru_reference(k):              # the same text side through nn.GRU's packed path
        tokens, lengths = batches[k]
        x = model.text.embed(tokens.to(args.device))
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        model.text.rnn(packed)[1][0].sum().backward()
        sync(args.device)

    def gru_ours(k):                   # fnemm's training path (what text_side runs on a CPU)
        tokens, lengths = batches[k]
        gru_last_states(model.text.rnn, model.text.embed(tokens.to(args.device)), lengths).sum().backward()
        sync(args.device)

    step_s = timed(full_step)
    parts = {"text side (embeddings + GRU), fwd+bwd": timed(text_side),
             "image map, fwd+bwd": timed(image_side), "clipping + Adam": timed(update)}
    pairs_s = bs / step_s
    print(f"{args.preset}: embed {cfg.model.embed_dim}, word {cfg.model.word_dim}, vocab {vocab_size}, "
          f"features {args.feature_dim} ({'float32' if args.float_features else 'int8 codes'}), batch {bs}, "
          f"{source}, device {args.device}, torch threads {torch.get_num_threads()}; CPU: {cpu_features()}")
    print(f"training step: {pairs_s:8.1f} pairs/s  ({1000 * step_s:.0f} ms per batch of {bs})")
    for name, dt in parts.items():
        print(f"  {name:<40} {1000 * dt:7.0f} ms  {100 * dt / step_s:5.1f} % of a step")
    print(f"  (the hinge loss and the rest: {100 * (1 - sum(parts.values()) / step_s):.1f} %)")
    print(f"projected: {6000 / pairs_s:.0f} s per Flickr8K epoch (6,000 pairs, without validation)")
    if args.device == "cpu" and not cfg.model.layer_norm:
        rounds = [(timed(gru_reference), timed(gru_ours)) for _ in range(3)]     # alternately
        ref, ours = min(r for r, _ in rounds), min(o for _, o in rounds)
        print(f"text GRU fwd+bwd: nn.GRU packed {1000 * ref:.0f} ms, gru_last_states {1000 * ours:.0f} ms "
              f"(best of 3 each): {ref / ours:.2f}x")


if __name__ == "__main__":
    main()
