"""A fine-tuned CNN on disk (``RUN/cnn.pt``), usable as ``--weights`` wherever a CNN is built.

``fnemm train --finetune`` writes the whole network's state after fine-tuning as::

    {"format": "fnemm-cnn", "version": 1, "cnn": "mobilenet_v2_float",
     "base_weights": path, "base_weights_sha256": ..., "preprocess": {...},
     "finetuned": {"epoch", "blocks", "from"}, "state": net.state_dict()}

``build_cnn(name, "RUN/cnn.pt")`` rebuilds the architecture from the base weights
(where they are, else the builder's own or random ones: every tensor is then
replaced) and loads the state; the CNN's ``info`` names the file, its sha256 and the
run, so a feature store extracted with it records where its weights came from.
The bytes are a function of the state alone (``torch.save`` is deterministic), so
the sha256 a checkpoint records can always be re-created from that checkpoint.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch

from fnemm.io.errors import FnemmError
from fnemm.io.files import sha256_file

FORMAT = "fnemm-cnn"


def is_finetuned(path: str | Path) -> bool:
    """Whether ``path`` is a fnemm-cnn file: a torch zip archive whose pickle names the
    format (read without loading any tensor)."""
    try:
        with zipfile.ZipFile(path) as z:
            pickles = [n for n in z.namelist() if n.endswith("data.pkl")]
            return bool(pickles) and FORMAT.encode() in z.read(pickles[0])[:4096]
    except (OSError, zipfile.BadZipFile):
        return False


def to_bytes(cnn_name: str, state: dict, base_info: dict, preprocess: dict, finetuned: dict) -> bytes:
    """The file's bytes (the same state gives the same bytes)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": 1, "cnn": cnn_name,
                "base_weights": base_info.get("weights"), "base_weights_sha256": base_info.get("weights_sha256"),
                "base_weights_format": base_info.get("weights_format"), "quant": base_info.get("quant"),
                "preprocess": preprocess, "finetuned": finetuned,
                "state": {k: v.detach().cpu().contiguous() for k, v in state.items()}}, buf)
    return buf.getvalue()


def load(name: str, path: str | Path, builder):
    """The fine-tuned CNN in ``path``, built by ``builder`` (the registered one for ``name``)."""
    from fnemm.features.cnn import Preprocess, TappedCNN
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unpickling failure means a damaged file)
        raise FnemmError(f"{path}: a damaged fine-tuned CNN file ({type(e).__name__}); re-export it with "
                         f"`fnemm train --out RUN --resume` or fine-tune again") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or "state" not in saved:
        raise FnemmError(f"{path}: not a fine-tuned CNN file of fnemm")
    if saved["cnn"] != name:
        raise FnemmError(f"{path}: holds a fine-tuned {saved['cnn']}, not {name}; pass --cnn {saved['cnn']}")
    base = saved.get("base_weights")
    usable = base and Path(base).is_file() and sha256_file(base) == saved.get("base_weights_sha256")
    try:
        cnn: TappedCNN = builder(base if usable else None)
    except FnemmError:
        try:
            cnn = builder("random")     # the architecture only: every tensor is replaced below
        except FnemmError:
            raise FnemmError(f"{path}: rebuilding {name} needs its base weights {base} (the architecture "
                             f"is read from them); put them back at that path") from None
    try:
        cnn.net.load_state_dict(saved["state"])
    except (RuntimeError, KeyError) as e:
        raise FnemmError(f"{path}: does not fit {name} ({str(e).splitlines()[0][:120]})") from None
    cnn.preprocess = Preprocess(**{**saved["preprocess"], "mean": tuple(saved["preprocess"]["mean"]),
                                   "std": tuple(saved["preprocess"]["std"])})
    cnn.info = {"cnn": name, "weights": str(path.resolve()), "weights_sha256": sha256_file(path),
                "weights_format": "fnemm-cnn", "finetuned": saved.get("finetuned", {}),
                **({"quant": saved["quant"]} if saved.get("quant") else {})}
    return cnn
