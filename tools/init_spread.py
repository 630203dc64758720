"""How alike an untrained model's embeddings are, by initialisation: the mean pairwise
cosine of the caption embeddings (and, given a feature store, of the image embeddings)
at step 0. Max of hinges learns nothing while every score is about equal (its loss
sits at 2 x margin x batch), so the closer this is to 1, the longer a run sits on that
plateau; README "Fidelity" reads it beside the runs.

    .venv/bin/python tools/init_spread.py [--dataset flickr8k-224] [--store STORE]
        [--presets flickr8k/FC7-MH,flickr8k/FNE-MH] [--images 400] [--seeds 3]

Captions: the first --images validation images' (5 each), tokenised with the train+val
vocabulary as training does; images: the store's first rows of the preset's kind (fc7
for a -bl/FC7 preset's baseline, fne otherwise).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch


def mean_pairwise_cosine(e: torch.Tensor) -> float:
    """Mean cosine over all pairs i != j of unit rows, from the sum of the Gram matrix."""
    e = e.double()
    n = len(e)
    total = e.sum(0).square().sum().item()           # sum_ij e_i . e_j
    return (total - n) / (n * n - n)


def main(argv=None) -> None:
    from fnemm.datasets import load_dataset
    from fnemm.features.store import load_features
    from fnemm.joint.inputs import build_vocab, embed_captions, embed_images
    from fnemm.joint.config import INITS
    from fnemm.joint.model import JointEmbedding
    from fnemm.joint.presets import get_preset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="flickr8k-224")
    p.add_argument("--store", help="a feature store: the image side too")
    p.add_argument("--presets", default="flickr8k/FC7-MH,flickr8k/FNE-MH")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    ds = load_dataset(args.dataset)
    vocab = build_vocab(ds)
    val = ds.split_indices("val")[:args.images]
    captions = [vocab.encode(c) for k in val for c in ds.captions[k]]
    print(f"{args.dataset}: {len(captions)} validation captions; mean pairwise cosine at initialisation, "
          f"seeds 0-{args.seeds - 1}")
    print("| preset | side | init | mean pairwise cosine (per seed) |\n|---|---|---|---|")
    for name in args.presets.split(","):
        config = get_preset(name)
        kind = config.features
        rows = None
        if args.store:
            store = load_features(args.store, kind)
            rows = np.asarray(store.array[:5 * args.images])
        for init in INITS:
            model_config = replace(config.model, init=init)
            cap, img = [], []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = JointEmbedding(model_config, len(vocab), rows.shape[1] if rows is not None else 8).eval()
                with torch.no_grad():
                    cap.append(mean_pairwise_cosine(embed_captions(model, captions, "cpu")))
                    if rows is not None and init == INITS[0]:     # the GRU's init does not touch the image map
                        img.append(mean_pairwise_cosine(embed_images(model, rows, "cpu")))
            dims = f"word {model_config.word_dim}, hidden {model_config.embed_dim}"
            print(f"| {name} | captions ({dims}) | {init} | {np.mean(cap):.3f} ({', '.join(f'{c:.3f}' for c in cap)}) |")
            if img:
                print(f"| {name} | images ({kind}, {rows.shape[1]} dims, {len(rows)} rows) | either | "
                      f"{np.mean(img):.3f} ({', '.join(f'{c:.3f}' for c in img)}) |")


if __name__ == "__main__":
    main()
