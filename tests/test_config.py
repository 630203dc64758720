import pytest

from fnemm import PRESETS, FnemmError, apply_overrides, get_preset
from fnemm.config import TrainConfig


def test_every_table1_variant_exists():
    assert len(PRESETS) == 4 * 2 * 10
    for fam in ("flickr8k", "flickr30k", "coco", "demo"):
        for feat in ("FNE", "FC7"):
            for pipe in ("SH", "SH-bl", "MH", "MH-bl", "SOE", "SOE-bl", "MOE", "MOE-bl", "PH", "POE"):
                assert f"{fam}/{feat}-{pipe}" in PRESETS


def test_table1_values():
    mh = get_preset("flickr8k/fne-mh")
    assert (mh.model.embed_dim, mh.model.word_dim, mh.model.similarity, mh.model.use_abs) == (1024, 1024, "cosine", False)
    assert [(s.loss, s.lr, s.margin, s.max_epochs) for s in mh.stages] == [("max", 2e-4, 0.2, 400)]
    assert mh.batch_size == 128 and mh.grad_clip == 2.0 and mh.features == "fne"
    assert get_preset("flickr30k/FNE-MH").model.embed_dim == 1536
    assert get_preset("coco/FNE-MH").model.embed_dim == 2048
    assert get_preset("coco/FC7-MH").stages[0].max_epochs == 200
    moe = get_preset("flickr8k/FC7-MOE")
    assert (moe.model.embed_dim, moe.model.word_dim, moe.stages[0].lr, moe.stages[0].margin,
            moe.model.use_abs, moe.features) == (1536, 1536, 1e-3, 0.05, True, "fc7")
    moebl = get_preset("flickr8k/FNE-MOE-bl")
    assert (moebl.model.similarity, moebl.stages[0].lr, moebl.stages[0].margin, moebl.model.use_abs) == \
        ("order", 2e-4, 0.2, False)
    poe = get_preset("flickr8k/FNE-POE")
    assert [(s.loss, s.lr) for s in poe.stages] == [("sum", 1e-3), ("max", 1e-4)]
    assert poe.stages[0].patience is not None and poe.stages[1].patience is None
    coco_sh = get_preset("coco/FNE-SH")
    assert coco_sh.model.word_dim == 2000 and coco_sh.stages[0].lr == 2.5e-4
    assert get_preset("coco/FNE-POE").model.embed_dim == 2048


def test_overrides():
    base = get_preset("flickr8k/FNE-POE")
    c = apply_overrides(base, ["model.embed_dim=256", "stages.1.lr=5e-5", "stages.max_epochs=3",
                               "stages.0.patience=none", "model.layer_norm=yes", "features=fc7"])
    assert c.model.embed_dim == 256 and c.model.layer_norm and c.features == "fc7"
    assert [s.lr for s in c.stages] == [1e-3, 5e-5]
    assert [s.max_epochs for s in c.stages] == [3, 3] and c.stages[0].patience is None
    assert TrainConfig.from_dict(c.to_dict()) == c
    for bad, msg in [("model.embed=3", "no field 'embed'"), ("model.embed_dim=big", "expected int"),
                     ("stages.4.lr=1", "2 stage"), ("lr", "KEY=VALUE"), ("model=3", "name a field"),
                     ("model.similarity=l2", "similarity"), ("batch_size=1", "batch_size")]:
        with pytest.raises(FnemmError, match=msg):
            apply_overrides(base, [bad])


def test_unknown_preset_suggests():
    with pytest.raises(FnemmError, match="unknown preset 'flickr9k/FNE-MH'.*did you mean"):
        get_preset("flickr9k/FNE-MH")


def test_demo_presets_scale_flickr8k_without_changing_the_method():
    for feat in ("FNE", "FC7"):
        for pipe in ("MH", "SOE", "POE", "PH"):
            demo, full = PRESETS[f"demo/{feat}-{pipe}"], PRESETS[f"flickr8k/{feat}-{pipe}"]
            assert (demo.model.similarity, demo.model.use_abs, demo.features) == \
                (full.model.similarity, full.model.use_abs, full.features)
            assert [s.loss for s in demo.stages] == [s.loss for s in full.stages]
            assert [s.margin for s in demo.stages] == [s.margin for s in full.stages]
            assert demo.model.embed_dim == 512 and demo.batch_size == 64
            assert sum(s.max_epochs for s in demo.stages) == (120 if len(demo.stages) == 1 else 60)
            assert demo.stages[0].patience == (20 if len(demo.stages) == 1 else 8)
    assert PRESETS["demo/FNE-POE"].stages[1].lr == 1e-4 and PRESETS["demo/FNE-MH"].stages[0].lr == 1e-3
