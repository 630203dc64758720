"""Configuration as frozen dataclasses, ``--set`` overrides and validation.

The presets (the paper's variants as the authors ran them) are in fnemm.joint.presets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

from fnemm.io.errors import FnemmError


INITS = ("torch", "authors")      # the caption GRU's initialisations (joint.model)


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
    # The caption GRU's initialisation: 'torch' (PyTorch's defaults) or 'authors' (the paper's
    # Theano code: orthogonal recurrent weights, input weights in +-0.1, zero biases).
    init: str = "torch"
    # A bias on the image map: the paper's equation has none, the authors' code has one.
    image_bias: bool = False


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
class FinetuneConfig:
    """Fine-tuning the CNN end to end (fnemm.training.finetune): images -> CNN -> the baseline
    layer (pooled, L2) -> the image map, from a converged run on frozen fc7 features."""
    blocks: int = 2                # the last N blocks up to the baseline layer train; the rest is frozen
    cnn_lr_scale: float = 0.1      # the CNN's learning rate = the stage's x this (VSE++: 2e-5 vs 2e-4)
    train_bn: bool = False         # batch-norm statistics of the trained blocks update (frozen by default)
    crop_scale: float = 0.08       # random-resized crop: smallest area fraction (torchvision's 0.08)
    amp: bool = True               # bfloat16 autocast of the CNN on CUDA (no effect on a CPU)


@dataclass(frozen=True)
class TrainConfig:
    features: str = "fne"          # which array of the feature store: 'fne' or 'fc7'
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: tuple[StageConfig, ...] = (StageConfig(),)
    batch_size: int = 128          # 127 in-batch negatives per pair
    grad_clip: float = 2.0         # max gradient norm
    # 'global': one norm over all gradients (VSE++); 'per-tensor': each parameter tensor's
    # gradient clipped to the norm on its own (the authors' optimiser; the paper presets)
    grad_clip_mode: str = "global"
    # Decoupled weight decay (AdamW) of the image map only (0: none, the paper). The FNE
    # papers fed the codes to an L2-regularised SVM; the paper's map is unregularised.
    image_weight_decay: float = 0.0
    # 'standard': Adam as Kingma & Ba and torch define it; 'authors': the Adam of the
    # paper's Theano code, whose bias correction corrects almost nothing, so its first
    # few thousand steps are up to 6.6x larger (fnemm.training.optim.AuthorsAdam)
    adam: str = "standard"
    seed: int = 0
    # Captions per image used for validation/test (the standard protocol uses 5).
    eval_captions: int = 5
    # Validate on the first N validation images only (MSCOCO: the authors selected on 1K
    # of the 5K); None: all of them.
    val_images: int | None = None
    # Longer captions are cut to this many tokens, with a warning (the authors' code keeps
    # at most 100 words; real captions have < 50): one huge caption must not pad every
    # batch to its length.
    max_caption_tokens: int = 100
    # Fine-tune the CNN (fnemm train --finetune RUN); None: frozen features (the paper)
    finetune: FinetuneConfig | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config a dict (a config file, a run's config.json, a checkpoint's) holds, each
        field's type checked: JSON's "false" or 1024.0 must not train as true or fail deep in
        torch (:class:`ConfigTypeError`, a TypeError, names the field). Unknown fields raise
        the dataclass's TypeError."""
        d = _typed(cls, d, "")
        d["model"] = ModelConfig(**_typed(ModelConfig, d.get("model", {}), "model."))
        d["stages"] = tuple(StageConfig(**_typed(StageConfig, s, f"stages.{i}."))
                            for i, s in enumerate(d.get("stages", [{}])))
        if d.get("finetune") is not None:
            d["finetune"] = FinetuneConfig(**_typed(FinetuneConfig, d["finetune"], "finetune."))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class ConfigTypeError(FnemmError, TypeError):
    """A config field of the wrong type (a TypeError too, as the dataclass's own are)."""


def _typed(cls, d, prefix: str) -> dict:
    """``d``'s fields checked against ``cls``'s annotations (ints taken as floats where a
    float is due); nested configs are left as they are, for their own check."""
    if not isinstance(d, dict):
        raise ConfigTypeError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of fields, found "
                              f"{type(d).__name__}")
    hints, out = typing.get_type_hints(cls), dict(d)
    for key, value in d.items():
        if key in hints:
            out[key] = _value(value, hints[key], f"{prefix}{key}")
    return out


def _value(value, typ, name: str):
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if typing.get_origin(typ) is typing.Union or type(typ).__name__ == "UnionType":     # X | None
        return None if value is None and len(args) < len(typing.get_args(typ)) else _value(value, args[0], name)
    if dataclasses.is_dataclass(typ):
        ok = isinstance(value, dict)
    elif typing.get_origin(typ) is tuple:
        ok = isinstance(value, (list, tuple))
    elif typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif typ is float and isinstance(value, float) and not math.isfinite(value):     # JSON's NaN, Infinity
        raise ConfigTypeError(f"{name}={value}: expected a finite number")
    else:
        ok = isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
    if not ok:
        want = ("a mapping of fields" if dataclasses.is_dataclass(typ) else "a list" if typing.get_origin(typ) is tuple
                else {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(typ, ""))
        hint = ""
        if typ is float and isinstance(value, str):
            try:
                hint = f" (unquoted, with a point: {float(value)!r}; YAML reads 1e-3 as text, 1.0e-3 as a number)"
            except ValueError:
                pass
        raise ConfigTypeError(f"{name}={json.dumps(value)}: expected {want or getattr(typ, '__name__', typ)}{hint}")
    return value


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
        if typ is float and not math.isfinite(float(text)):
            raise FnemmError(f"--set {key}={text}: expected a finite number")
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
    if current is None and len(path) > 1:      # an optional section not set yet: from its defaults
        kinds = [a for a in typing.get_args(hints[name]) if dataclasses.is_dataclass(a)]
        if kinds:
            current = kinds[0]()
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


def with_warmup(config: TrainConfig, epochs: int) -> TrainConfig:
    """``config`` with ``epochs`` of sum-of-hinges training before its first stage (at
    that stage's lr and margin, all of them run; the next stage starts from their best).
    Max-of-hinges training from scratch first sits for tens of epochs where every score
    is about equal and the hardest negatives are noise (the loss near 2 x margin x batch);
    the sum over every negative moves the embedding off it in a few epochs (VSE++'s and
    VSE-infinity's practice; not the paper's: it trained its MH pipelines from scratch).
    Measured on the Flickr8K benchmark (README): it leaves the plateau early, but the model
    ends lower (-7.3 test rsum with 1,000 training images, -17.3 with 6,000)."""
    if epochs < 1:
        raise FnemmError(f"warm-up of {epochs} epochs: give at least 1")
    first = config.stages[0]
    if first.loss != "max":
        raise FnemmError("a warm-up is for max-of-hinges training: this pipeline's first stage is already "
                         "a sum of hinges")
    warm = StageConfig(loss="sum", lr=first.lr, margin=first.margin, max_epochs=epochs, patience=None)
    return dataclasses.replace(config, stages=(warm, *config.stages))


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


def differences(saved: TrainConfig | None, want: TrainConfig, most: int = 4) -> str:
    """What differs between a run's saved config and the one wanted, for an error: the
    dotted names of the first ``most`` differing fields (``stages.0.lr, model.init``), or
    'not a config' when the saved one could not be read as one."""
    if saved is None:
        return "not a config"

    def walk(x, y, prefix: str) -> list[str]:
        if isinstance(x, dict) and isinstance(y, dict):
            return [d for k in x.keys() | y.keys() for d in walk(x.get(k), y.get(k), f"{prefix}{k}.")]
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and len(x) == len(y):
            return [d for i, (u, v) in enumerate(zip(x, y)) for d in walk(u, v, f"{prefix}{i}.")]
        return [] if x == y else [prefix.rstrip(".")]
    fields = sorted(walk(dataclasses.asdict(saved), dataclasses.asdict(want), ""))
    return ", ".join(fields[:most]) + (", ..." if len(fields) > most else "")


def validate(config: TrainConfig) -> None:
    """Reject values that cannot train, with the field named."""
    from fnemm.joint.losses import REDUCTIONS, SIMILARITIES
    if config.features not in ("fne", "fc7"):
        raise FnemmError(f"features={config.features!r}: expected 'fne' or 'fc7'")
    if config.model.similarity not in SIMILARITIES:
        raise FnemmError(f"model.similarity={config.model.similarity!r}: expected one of {SIMILARITIES}")
    for i, st in enumerate(config.stages):
        if st.loss not in REDUCTIONS:
            raise FnemmError(f"stages.{i}.loss={st.loss!r}: expected one of {REDUCTIONS}")
        if st.lr <= 0 or st.max_epochs < 1:
            raise FnemmError(f"stages.{i}: lr must be > 0 and max_epochs >= 1")
        if st.patience is not None and st.patience < 1:     # 0 ended the stage before its first epoch
            raise FnemmError(f"stages.{i}: patience {st.patience}: expected at least 1 epoch (or none: no early stop)")
    if config.batch_size < 2:
        raise FnemmError("batch_size must be >= 2 (the loss needs in-batch negatives)")
    if config.model.init not in INITS:
        raise FnemmError(f"model.init={config.model.init!r}: expected 'torch' (PyTorch's GRU initialisation) "
                         f"or 'authors' (the paper's Theano code)")
    if min(config.model.word_dim, config.model.embed_dim) < 1:
        raise FnemmError("model.word_dim and model.embed_dim must be >= 1")
    if config.grad_clip_mode not in ("global", "per-tensor"):
        raise FnemmError(f"grad_clip_mode={config.grad_clip_mode!r}: expected 'global' or 'per-tensor'")
    if config.adam not in ("standard", "authors"):
        raise FnemmError(f"adam={config.adam!r}: expected 'standard' (Kingma & Ba, torch) or 'authors' "
                         f"(the paper's Theano code)")
    if config.val_images is not None and config.val_images < 1:
        raise FnemmError("val_images must be >= 1 (or none: every validation image)")
    if config.max_caption_tokens < 1:
        raise FnemmError("max_caption_tokens must be >= 1")
    if not 0 <= config.model.image_dropout < 1 or config.image_weight_decay < 0:
        raise FnemmError("model.image_dropout must be in [0, 1) and image_weight_decay >= 0")
    ft = config.finetune
    if ft is not None:
        if config.features != "fc7":
            raise FnemmError("finetune: the fine-tuned CNN feeds the image map its baseline layer (features=fc7); "
                             "an FNE of the fine-tuned CNN is a store extracted with --weights RUN/cnn.pt")
        if ft.blocks < 1 or ft.cnn_lr_scale <= 0 or not 0 < ft.crop_scale <= 1:
            raise FnemmError("finetune.blocks must be >= 1, finetune.cnn_lr_scale > 0, finetune.crop_scale in (0, 1]")
