import json
from pathlib import Path

import pytest

from fnemm import PRESETS, FnemmError, apply_overrides, get_preset
from fnemm.joint.config import TrainConfig


def test_every_table1_variant_exists():
    assert len(PRESETS) == 4 * 2 * 10
    for fam in ("flickr8k", "flickr30k", "coco", "demo"):
        for feat in ("FNE", "FC7"):
            for pipe in ("SH", "SH-bl", "MH", "MH-bl", "SOE", "SOE-bl", "MOE", "MOE-bl", "PH", "POE"):
                assert f"{fam}/{feat}-{pipe}" in PRESETS


def test_paper_preset_values():
    mh = get_preset("flickr8k/fne-mh")
    assert (mh.model.embed_dim, mh.model.word_dim, mh.model.similarity, mh.model.use_abs) == (1024, 1024, "cosine", False)
    # the paper's 400 epochs at 2e-4, then the authors' reload at 2e-5 for up to 800 from the best
    assert [(s.loss, s.lr, s.margin, s.max_epochs) for s in mh.stages] == [("max", 2e-4, 0.2, 400),
                                                                           ("max", 2e-5, 0.2, 800)]
    assert mh.batch_size == 128 and mh.grad_clip == 2.0 and mh.features == "fne"
    assert mh.grad_clip_mode == "per-tensor" and mh.val_images is None
    assert get_preset("flickr30k/FNE-MH").model.embed_dim == 1536
    assert get_preset("coco/FNE-MH").model.embed_dim == 2048
    assert get_preset("coco/FC7-MH").stages[0].max_epochs == 200
    moe = get_preset("flickr8k/FC7-MOE")
    assert (moe.model.embed_dim, moe.model.word_dim, moe.stages[0].lr, moe.stages[0].margin,
            moe.model.use_abs, moe.features) == (1536, 1536, 1e-4, 0.05, True, "fc7")
    moebl = get_preset("flickr8k/FNE-MOE-bl")
    assert (moebl.model.similarity, moebl.stages[0].lr, moebl.stages[0].margin, moebl.model.use_abs) == \
        ("order", 2e-4, 0.2, False)
    poe = get_preset("flickr8k/FNE-POE")
    assert [(s.loss, s.lr, s.max_epochs) for s in poe.stages] == [("sum", 1e-3, 200), ("max", 1e-4, 200)]
    assert poe.stages[0].patience is None and poe.stages[1].patience is None       # stage 1 in full
    coco_sh = get_preset("coco/FNE-SH")                        # the scripts: Flickr word dims and lrs
    assert coco_sh.model.word_dim == 1024 and coco_sh.stages[0].lr == 2e-4 and coco_sh.val_images == 1000
    coco_shbl = get_preset("coco/FNE-SH-bl")                  # no script: Table 1's caption
    assert coco_shbl.model.word_dim == 2000 and coco_shbl.stages[0].lr == 2.5e-4
    assert get_preset("coco/FNE-POE").model.embed_dim == 2048
    assert all(p.grad_clip_mode == "global" for n, p in PRESETS.items() if n.startswith("demo/"))


AUTHORS_FILE = Path(__file__).resolve().parents[2] / "shared" / "authors-launchers.md"
LOSS = {"SH": ("sum", "cosine"), "MH": ("max", "cosine"), "OE": ("sum", "order"), "MOE": ("max", "order")}


@pytest.mark.skipif(not AUTHORS_FILE.exists(), reason="../shared/authors-launchers.md not present")
def test_every_preset_follows_the_authors_scripts():
    """Each script row of ../shared/authors-launchers.md against its preset's last stage."""
    family = {"f8k": "flickr8k", "f30k": "flickr30k", "coco": "coco"}
    rows = [line.strip().strip("|").split("|") for line in AUTHORS_FILE.read_text().splitlines()
            if line.startswith("| ") and "_F" in line.split("|")[1]]
    assert len(rows) == 53
    for cells in rows:
        name, loss, sim, embed, word, lr, margin, use_abs, epochs, _reload = (c.strip() for c in cells)
        fam, rest = name.split("_", 1)
        preset = get_preset(f"{family[fam]}/{rest}")
        last = preset.stages[-1]
        assert (last.loss, preset.model.similarity) == LOSS[loss] and sim == preset.model.similarity, name
        assert (preset.model.embed_dim, preset.model.word_dim) == (int(embed), int(word)), name
        assert (last.lr, last.margin, last.max_epochs) == (float(lr), float(margin), int(epochs)), name
        assert preset.model.use_abs == (use_abs == "True"), name
        assert all(s.margin == float(margin) for s in preset.stages), name


def test_presets_say_where_values_come_from(capsys):
    from fnemm.cli import main
    assert main(["presets", "--show", "flickr8k/FNE-MOE"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["stages"][0]["lr"] == 1e-4                     # stdout: the config JSON alone
    assert "stages.0.lr: authors' script f8k_FNE-MOE; Table 1 says 0.001" in err
    assert main(["presets", "--paper-table", "--family", "coco"]) == 0
    table = capsys.readouterr().out
    assert "coco/FNE-MOE" in table and "0.0001/0.00025*" in table and "flickr8k" not in table


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
                     ("model.similarity=l2", "similarity"), ("batch_size=1", "batch_size"),
                     ("adam=kiros", "expected 'standard'.*or 'authors'"),
                     ("stages.0.patience=0", "patience 0: expected at least 1 epoch"),   # was 0 epochs, exit 0
                     ("stages.max_epochs=0", "max_epochs >= 1")]:
        with pytest.raises(FnemmError, match=msg):
            apply_overrides(base, [bad])


def test_unknown_preset_suggests():
    with pytest.raises(FnemmError, match="unknown preset 'flickr9k/FNE-MH'.*did you mean"):
        get_preset("flickr9k/FNE-MH")


def test_demo_presets_scale_flickr8k_without_changing_the_method():
    from fnemm.joint.presets import table1_preset
    for feat in ("FNE", "FC7"):
        for pipe in ("MH", "SOE", "POE", "PH"):
            demo, full = PRESETS[f"demo/{feat}-{pipe}"], table1_preset("flickr8k", feat, pipe)
            assert (demo.model.similarity, demo.model.use_abs, demo.features) == \
                (full.model.similarity, full.model.use_abs, full.features)
            assert [s.loss for s in demo.stages] == [s.loss for s in full.stages]
            assert [s.margin for s in demo.stages] == [s.margin for s in full.stages]
            assert demo.model.embed_dim == 512 and demo.batch_size == 64
            assert sum(s.max_epochs for s in demo.stages) == (120 if len(demo.stages) == 1 else 60)
            assert demo.stages[0].patience == (20 if len(demo.stages) == 1 else 8)
    assert PRESETS["demo/FNE-POE"].stages[1].lr == 1e-4 and PRESETS["demo/FNE-MH"].stages[0].lr == 1e-3
