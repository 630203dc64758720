"""Configuration as frozen dataclasses, and every paper variant as a preset.

PRESETS is Table 1 of the paper, read line by line: for each dataset family
(flickr8k, flickr30k, coco), each image feature (FNE, FC7) and each pipeline
(SH, SH-bl, MH, MH-bl, SOE, SOE-bl, MOE, MOE-bl, PH, POE) one TrainConfig.
Names look like ``flickr8k/FNE-MH`` (case-insensitive).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, replace

from fnemm.errors import FnemmError


@dataclass(frozen=True)
class ModelConfig:
    word_dim: int = 1024           # trainable word embedding size
    embed_dim: int = 1024          # joint space size = GRU hidden units
    similarity: str = "cosine"     # 'cosine' (Eq. 2) or 'order' (Eq. 3)
    use_abs: bool = False          # absolute value of both embeddings (order variants)
    layer_norm: bool = False       # layer-normalised GRU (Ba et al. 2016)
    # Dropout on the image features before the image map, while training (0: none, the
    # paper). With thousands of FNE dimensions and few images the map overfits early.
    image_dropout: float = 0.0


@dataclass(frozen=True)
class StageConfig:
    """One training stage; curriculum pipelines (PH, POE) chain two."""
    loss: str = "max"              # 'sum' (L_S, Eq. 1) or 'max' (L_M, Eq. 4)
    lr: float = 2e-4               # Adam learning rate
    margin: float = 0.2            # hinge margin alpha
    max_epochs: int = 200
    # Epochs without a better validation rsum before the stage ends; None runs
    # to max_epochs (the paper's protocol: keep the best epoch of all).
    patience: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    features: str = "fne"          # which array of the feature store: 'fne' or 'fc7'
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: tuple[StageConfig, ...] = (StageConfig(),)
    batch_size: int = 128          # 127 in-batch negatives per pair
    grad_clip: float = 2.0         # max gradient norm
    # Decoupled weight decay (AdamW) of the image map only (0: none, the paper). The FNE
    # papers fed the codes to an L2-regularised SVM; the paper's map is unregularised.
    image_weight_decay: float = 0.0
    seed: int = 0
    # Captions per image used for validation/test (the standard protocol uses 5).
    eval_captions: int = 5
    # Longer captions are cut to this many tokens, with a warning (the authors' code keeps
    # at most 100 words; real captions have < 50): one huge caption must not pad every
    # batch to its length.
    max_caption_tokens: int = 100

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["model"] = ModelConfig(**d.get("model", {}))
        d["stages"] = tuple(StageConfig(**s) for s in d.get("stages", [{}]))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --- Table 1 -------------------------------------------------------------
FAMILIES = ("flickr8k", "flickr30k", "coco")
FEATURES = ("FNE", "FC7")

# pipeline: (stage losses, similarity, embed dim f8k/f30k/coco, word dim, lr(s), margin, abs)
_TABLE1 = {
    "SH":     (("sum",), "cosine", (1536, 1536, 1536), 1024, (2e-4,), 0.2, False),
    "SH-bl":  (("sum",), "cosine", (2048, 2048, 2048), 1000, (2e-4,), 0.2, False),
    "MH":     (("max",), "cosine", (1024, 1536, 2048), 1024, (2e-4,), 0.2, False),
    "MH-bl":  (("max",), "cosine", (1024, 1024, 1024), 300, (2e-4,), 0.2, False),
    "SOE":    (("sum",), "order", (1024, 1024, 1536), 1024, (1e-3,), 0.05, True),
    "SOE-bl": (("sum",), "order", (1024, 1024, 1024), 300, (1e-3,), 0.05, True),
    "MOE":    (("max",), "order", (1536, 1536, 2048), 1536, (1e-3,), 0.05, True),
    "MOE-bl": (("max",), "order", (1024, 1024, 1024), 300, (2e-4,), 0.2, False),
    "PH":     (("sum", "max"), "cosine", (1536, 1536, 1536), 1024, (2e-4, 2e-4), 0.2, False),
    "POE":    (("sum", "max"), "order", (1024, 1024, 2048), 1024, (1e-3, 1e-4), 0.05, True),
}
PIPELINES = tuple(_TABLE1)
COCO_WORD_DIM = 2000   # Table 1 caption: MSCOCO uses word dim 2000 ...
COCO_LR = 2.5e-4       # ... and learning rate 0.00025
MAX_EPOCHS = 200
MAX_EPOCHS_MH_FLICKR = 400   # MH runs on Flickr8K/30K ran 400 epochs (Sec. 4.3.1)
# The paper ends the sum stage of a curriculum when validation "stops improving"
# without a number; 20 epochs without a new best is our reading of it.
CURRICULUM_PATIENCE = 20


def _preset(family: str, feature: str, pipeline: str) -> TrainConfig:
    losses, sim, dims, word_dim, lrs, margin, use_abs = _TABLE1[pipeline]
    fi = FAMILIES.index(family)
    if family == "coco":
        word_dim = COCO_WORD_DIM
        # Only the single learning rate is replaced; POE keeps its two-stage schedule.
        lrs = (COCO_LR,) * len(lrs) if len(set(lrs)) == 1 else lrs
    epochs = MAX_EPOCHS
    if pipeline in ("MH", "MH-bl") and family != "coco":
        epochs = MAX_EPOCHS_MH_FLICKR
    curriculum = len(losses) > 1
    stages = tuple(
        StageConfig(loss=loss, lr=lr, margin=margin, max_epochs=epochs,
                    patience=CURRICULUM_PATIENCE if curriculum and i == 0 else None)
        for i, (loss, lr) in enumerate(zip(losses, lrs))
    )
    return TrainConfig(
        features=feature.lower(),
        model=ModelConfig(word_dim=word_dim, embed_dim=dims[fi], similarity=sim, use_abs=use_abs),
        stages=stages,
    )


# "demo": Table 1's Flickr8K pipelines scaled to flickr8k-1k (753 training images) on a
# 2-core CPU within minutes: smaller dimensions, batches of 64 (so an epoch has more
# than a handful of steps), learning rates of at least 1e-3. Measured on flickr8k-1k
# (MobileNetV2 FNE): 2e-4 with batch 128 was still at val rsum 126 after 30 epochs;
# 1e-3 with batch 64 reached 248 by epoch 40. Single-stage runs stop 20 epochs after
# their best validation rsum (at most 120): FNE-MH peaks near epoch 60 and then
# overfits, while FC7-MH (L2-normalised input) keeps improving until ~epoch 100, so a
# fixed 60-epoch budget would have favoured FNE.
DEMO_DIMS = {"word_dim": 300, "embed_dim": 512}
DEMO_BATCH = 64
DEMO_EPOCHS = (120, 20)        # single-stage pipelines: max epochs, patience
DEMO_CURRICULUM = (40, 8, 20)  # stage 1 max epochs, its patience, stage 2 max epochs


def _demo_preset(feature: str, pipeline: str) -> TrainConfig:
    base = _preset("flickr8k", feature, pipeline)
    if len(base.stages) == 1:
        st = base.stages[0]
        stages = (replace(st, lr=max(st.lr, 1e-3), max_epochs=DEMO_EPOCHS[0], patience=DEMO_EPOCHS[1]),)
    else:
        first, second = base.stages
        epochs1, patience, epochs2 = DEMO_CURRICULUM
        stages = (replace(first, lr=max(first.lr, 1e-3), max_epochs=epochs1, patience=patience),
                  replace(second, max_epochs=epochs2))
    return replace(base, model=replace(base.model, **DEMO_DIMS), stages=stages, batch_size=DEMO_BATCH)


PRESETS: dict[str, TrainConfig] = {
    **{f"{fam}/{feat}-{pipe}": _preset(fam, feat, pipe)
       for fam in FAMILIES for feat in FEATURES for pipe in PIPELINES},
    **{f"demo/{feat}-{pipe}": _demo_preset(feat, pipe) for feat in FEATURES for pipe in PIPELINES},
}


def get_preset(name: str) -> TrainConfig:
    """The preset called ``name`` (e.g. 'flickr8k/FNE-MH'), case-insensitive."""
    by_lower = {k.lower(): v for k, v in PRESETS.items()}
    try:
        return by_lower[name.lower()]
    except KeyError:
        close = [k for k in PRESETS if name.lower().split("/")[-1] in k.lower()][:4]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise FnemmError(f"unknown preset {name!r}{hint}; `fnemm presets` lists all "
                         f"{len(PRESETS)} of them") from None


# --- overrides: --set key=value ------------------------------------------

def _coerce(text: str, typ, key: str):
    """Parse ``text`` as a value of the annotated type ``typ``."""
    origin = typing.get_origin(typ)
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if origin is typing.Union or type(typ).__name__ == "UnionType":
        if text.lower() in ("none", "null"):
            return None
        return _coerce(text, args[0], key)
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ in (int, float, str):
            return typ(text)
    except ValueError:
        raise FnemmError(f"--set {key}={text}: expected {typ.__name__}") from None
    raise FnemmError(f"--set {key}: this field cannot be set from the command line")


def _set(obj, path: list[str], text: str, key: str):
    """A copy of dataclass ``obj`` with the field at ``path`` set from ``text``."""
    if isinstance(obj, tuple):     # stages.N.field ; stages.field sets every stage
        if path[0].isdigit():
            i = int(path[0])
            if i >= len(obj):
                raise FnemmError(f"--set {key}: this config has {len(obj)} stage(s)")
            return obj[:i] + (_set(obj[i], path[1:], text, key),) + obj[i + 1:]
        return tuple(_set(item, path, text, key) for item in obj)
    hints = typing.get_type_hints(type(obj))
    name = path[0]
    if name not in hints:
        fields = ", ".join(hints)
        raise FnemmError(f"--set {key}: no field {name!r} in {type(obj).__name__} (fields: {fields})")
    current = getattr(obj, name)
    if len(path) > 1 or dataclasses.is_dataclass(current) or isinstance(current, tuple):
        if len(path) == 1:
            raise FnemmError(f"--set {key}: name a field inside it, e.g. {key}.{_first_field(current)}")
        value = _set(current, path[1:], text, key)
    else:
        value = _coerce(text, hints[name], key)
    return dataclasses.replace(obj, **{name: value})


def _first_field(obj) -> str:
    obj = obj[0] if isinstance(obj, tuple) else obj
    return dataclasses.fields(obj)[0].name


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` overrides with dotted keys, e.g. ``model.embed_dim=512``,
    ``stages.0.lr=1e-3`` or ``stages.max_epochs=5`` (every stage)."""
    for item in overrides:
        if "=" not in item:
            raise FnemmError(f"--set {item!r}: expected KEY=VALUE, e.g. model.embed_dim=512")
        key, text = item.split("=", 1)
        config = _set(config, key.strip().split("."), text.strip(), key)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Reject values that cannot train, with the field named."""
    from fnemm.losses import REDUCTIONS, SIMILARITIES
    if config.features not in ("fne", "fc7"):
        raise FnemmError(f"features={config.features!r}: expected 'fne' or 'fc7'")
    if config.model.similarity not in SIMILARITIES:
        raise FnemmError(f"model.similarity={config.model.similarity!r}: expected one of {SIMILARITIES}")
    for i, st in enumerate(config.stages):
        if st.loss not in REDUCTIONS:
            raise FnemmError(f"stages.{i}.loss={st.loss!r}: expected one of {REDUCTIONS}")
        if st.lr <= 0 or st.max_epochs < 1:
            raise FnemmError(f"stages.{i}: lr must be > 0 and max_epochs >= 1")
    if config.batch_size < 2:
        raise FnemmError("batch_size must be >= 2 (the loss needs in-batch negatives)")
    if min(config.model.word_dim, config.model.embed_dim) < 1:
        raise FnemmError("model.word_dim and model.embed_dim must be >= 1")
    if config.max_caption_tokens < 1:
        raise FnemmError("max_caption_tokens must be >= 1")
    if not 0 <= config.model.image_dropout < 1 or config.image_weight_decay < 0:
        raise FnemmError("model.image_dropout must be in [0, 1) and image_weight_decay >= 0")
