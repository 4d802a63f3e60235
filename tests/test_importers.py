"""Importers of the official FlowNet2 weights: Caffe (.caffemodel, .caffemodel.h5) and
flownet2-pytorch checkpoints, written here from randomly initialised models.

The .caffemodel files are written by an encoder built from the published field numbers of
caffe.proto (BVLC caffe / lmb-freiburg flownet2, src/caffe/proto/caffe.proto), independently of
the decoder, with the official layer names taken from the deploy prototxts and BGR-ordered conv1
weights as Caffe trained them.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from conftest import REFERENCE
from edgeflow.cli import main
from edgeflow.errors import InputError
from edgeflow.models import caffe, create, spec
from edgeflow.models.importers import detect_format, import_weights, load_official
from edgeflow.models.stack import FlowNet2, upsample_flow

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are small: one thread is faster than two fighting a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- a caffe.proto encoder ------------------------------------------------------------------
# NetParameter: name 1, layers 2 (V1LayerParameter), layer 100 (LayerParameter)
# LayerParameter: name 1, type 2, bottom 3, loss_weight 5, param 6, blobs 7, phase 10, convolution_param 106
# V1LayerParameter: bottom 2, name 4, type 5 (CONVOLUTION 4, DECONVOLUTION 39, RELU 18), blobs 6
# BlobProto: num 1, channels 2, height 3, width 4, data 5 (packed float), shape 7; BlobShape: dim 1 (packed)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def ld(field: int, payload: bytes) -> bytes:
    return key(field, 2) + varint(len(payload)) + payload


def blob_proto(arr: np.ndarray, legacy: bool = False) -> bytes:
    arr = np.asarray(arr, np.float32)
    if legacy:  # V1 era: 4-D num/channels/height/width, biases as (1, 1, 1, N)
        dims = (1,) * (4 - arr.ndim) + arr.shape
        head = b"".join(key(f, 0) + varint(d) for f, d in zip((1, 2, 3, 4), dims))
    else:
        head = ld(7, ld(1, b"".join(varint(d) for d in arr.shape)))
    return head + ld(5, arr.astype("<f4").tobytes())


def layer_v2(name: str, kind: str, blobs) -> bytes:
    return (ld(1, name.encode()) + ld(2, kind.encode()) + ld(3, b"bottom_blob")
            + key(5, 5) + np.float32(1.0).tobytes()                 # loss_weight (fixed32)
            + ld(6, key(3, 5) + np.float32(1.0).tobytes())           # param { lr_mult: 1 }
            + b"".join(ld(7, blob_proto(b)) for b in blobs)
            + key(10, 0) + varint(1)                                 # phase: TEST
            + ld(106, key(1, 0) + varint(24)))                       # convolution_param { num_output }


def layer_v1(name: str, kind: str, blobs) -> bytes:
    enum = {"Convolution": 4, "Deconvolution": 39, "ReLU": 18}[kind]
    return (ld(2, b"bottom_blob") + ld(4, name.encode()) + key(5, 0) + varint(enum)
            + b"".join(ld(6, blob_proto(b, legacy=True)) for b in blobs))


def caffemodel_bytes(layers, v1: bool = False) -> bytes:
    out = [ld(1, b"FlowNet2"), ld(3, b"img0")]                       # name, input
    for name, kind, blobs in layers:
        if v1 and kind == "DataAugmentation":  # not in the V1 enum
            continue
        out.append(ld(2, layer_v1(name, kind, blobs)) if v1 else ld(100, layer_v2(name, kind, blobs)))
    return b"".join(out)


def write_h5(path, layers) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for name, _, blobs in layers:
            group = data.create_group(name)
            for i, b in enumerate(blobs):
                group.create_dataset(str(i), data=np.asarray(b, np.float32))


# ---- official layer names and layouts, from ../shared/reference/flownet2-caffe ----------------

def official_names(stages: str, width: float) -> dict[str, str]:
    """{our module: Caffe layer name}, as the deploy prototxts name them."""
    table = {}
    for i, kind in enumerate(stages):
        stage = ("flownetc" if kind == "c" else "flownets") if i == 0 else f"flownets_{i}"
        p = ("", "net2_", "net3_")[i]
        convs = ["conv1", "conv2", "conv3", "conv3_1", "conv4", "conv4_1", "conv5", "conv5_1", "conv6", "conv6_1"]
        for c in convs + (["conv_redir"] if kind == "c" else []):
            table[f"{stage}.{c}.0"] = p + c
        for k in (5, 4, 3, 2):
            table[f"{stage}.deconv{k}.0"] = f"{p}deconv{k}"
        numbered = i == 0 and (kind == "c" or width == 1.0)  # Convolution1..5 (1 = flow6)
        for n, k in enumerate((6, 5, 4, 3, 2), 1):
            table[f"{stage}.predict_flow{k}"] = f"{p}Convolution{n}" if numbered else f"{p}predict_conv{k}"
        for k in (6, 5, 4, 3):
            table[f"{stage}.upsampled_flow{k}_to_{k - 1}"] = f"{p}{p}upsample_flow{k}to{k - 1}"
    return table


MEAN_BGR = {"img0s_aug": [0.411, 0.432, 0.450], "img1s_aug": [0.410, 0.431, 0.449]}


def to_bgr(weight: np.ndarray, stage: str) -> np.ndarray:
    """conv1 `weight` of `stage` with each input image's channels reversed: FlowNetS 2 images,
    FlowNetC 1 (siamese), a stacked stage 3 (img1, img2, warped img2; then flow and error)."""
    groups = 3 if stage.startswith("flownets_") else 1 if stage == "flownetc" else 2
    w = weight.copy()
    for g in range(groups):
        w[:, 3 * g:3 * g + 3] = weight[:, 3 * g:3 * g + 3][:, ::-1]
    return w


def caffe_layers(model: FlowNet2):
    """[(name, type, blobs)] of `model` in the official layout (conv1 input in BGR order)."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    layers = [(name, "DataAugmentation",
               [np.full((1, 1, 1, 1), 1001.0), np.zeros((1, 3, 8, 8)), np.reshape(mean, (1, 3, 1, 1))])
              for name, mean in MEAN_BGR.items()]
    layers.append(("DataAugmentation1", "DataAugmentation", [np.full((1, 1, 1, 1), 1001.0)]))  # as in -ft-sd
    for module, name in official_names(model.stages, model.width).items():
        w = sd[f"{module}.weight"]
        if module.endswith(".conv1.0"):
            w = to_bgr(w, module.split(".")[0])
        deconv = ".deconv" in module or ".upsampled" in module
        bias = sd.get(f"{module}.bias", np.zeros(w.shape[1], np.float32))  # upsampling: Caffe's zero bias
        layers.append((name, "Deconvolution" if deconv else "Convolution", [w, bias]))
        layers.append((f"ReLU_{name}", "ReLU", []))
    return layers


def random_model(name: str, seed: int = 0) -> FlowNet2:
    torch.manual_seed(seed)
    s = spec(name)
    model = FlowNet2(s.stages, s.width).eval()
    with torch.no_grad():  # non-zero biases, so that a lost or misplaced bias shows
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(-0.1, 0.1)
    return model


def assert_same(a: FlowNet2, b: FlowNet2) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_caffe_outputs(imported: FlowNet2, original: FlowNet2) -> None:
    """The imported model on RGB equals the Caffe-layout (BGR conv1) network on BGR input."""
    bgr_net = FlowNet2(original.stages, original.width).eval()
    sd = original.state_dict()
    for key in sd:
        if key.endswith(".conv1.0.weight"):
            sd[key] = torch.from_numpy(to_bgr(sd[key].numpy(), key.split(".")[0]))
    bgr_net.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    img1 = torch.rand(1, 3, 64, 64, generator=g)
    img2 = torch.roll(img1, (2, 3), (2, 3)) * 0.9 + 0.05
    with torch.no_grad():
        ours = imported(img1, img2)
        theirs = bgr_net(img1.flip(1), img2.flip(1))
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# ---- Caffe ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,v1", [("flownet2-s", False), ("flownet2-css", False), ("flownet2-c", True)])
def test_caffemodel_roundtrip(tmp_path, name, v1):
    model = random_model(name)
    path = tmp_path / "net.caffemodel"
    path.write_bytes(caffemodel_bytes(caffe_layers(model), v1=v1))
    assert detect_format(path) == "caffemodel"
    imported, meta = load_official(path, name)
    assert_same(imported, model)
    assert_caffe_outputs(imported, model)
    assert meta["source_format"] == "caffemodel"
    if not v1:
        assert meta["caffe_mean_rgb"]["img1"] == pytest.approx(MEAN_BGR["img0s_aug"][::-1])


def test_caffemodel_h5_roundtrip(tmp_path):
    model = random_model("flownet2-cs")
    layers = caffe_layers(model)
    path = tmp_path / "net.caffemodel.h5"
    write_h5(path, layers)  # ReLU layers become empty groups, as Caffe writes them
    assert detect_format(path) == "caffemodel.h5"
    imported, meta = load_official(path, "flownet2-cs")
    assert_same(imported, model)
    assert_caffe_outputs(imported, model)
    assert set(meta["caffe_mean_rgb"]) == {"img1", "img2"}


def test_import_weights_writes_loadable_file(tmp_path, capsys):
    model = random_model("flownet2-s")
    src = tmp_path / "FlowNet2-s_weights.caffemodel"
    src.write_bytes(caffemodel_bytes(caffe_layers(model)))
    out = tmp_path / "s.pt"
    assert main(["import-weights", str(src), "--model", "flownet2-s", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "flownet2-s" in printed and "note: the file keeps Caffe's fixed input means (img1 RGB 0.450 0.432 0.411" in printed
    assert_same(create("flownet2-s", weights=out), model)  # fp32 by default: exact
    half = import_weights(src, "flownet2-s", tmp_path / "half.pt", half=True)
    assert half["params"] == sum(p.numel() for p in model.parameters())
    loaded = create("flownet2-s", weights=half["out"])
    torch.testing.assert_close(loaded.flownets.conv2[0].weight, model.flownets.conv2[0].weight,
                               rtol=1e-3, atol=1e-4)


def test_final_resample_matches_caffe():
    """Caffe's Resample (LINEAR, upsampling: no antialias) from flow2 to the adapted size is our
    bilinear align_corners=False upsampling (port of resample_layer.cu InterpolationKernel)."""
    rng = np.random.default_rng(0)
    low = rng.normal(size=(2, 5, 7)).astype(np.float32)
    out_h, out_w = 20, 28
    fx, fy = 7 / out_w, 5 / out_h
    tri = lambda d: max(0.0, 1 - abs(d))  # noqa: E731
    ref = np.zeros((2, out_h, out_w), np.float32)
    for yo in range(out_h):
        for xo in range(out_w):
            x_in, y_in = xo * fx + fy / 2 - 0.5, yo * fy + fx / 2 - 0.5
            total, wsum = np.zeros(2), 0.0
            for y in range(math.floor(y_in + 0.5) - 2, math.floor(y_in + 0.5) + 3):
                for x in range(math.floor(x_in + 0.5) - 2, math.floor(x_in + 0.5) + 3):
                    if 0 <= y < 5 and 0 <= x < 7:
                        w = tri(x_in - x) * tri(y_in - y)
                        total += w * low[:, y, x]
                        wsum += w
            ref[:, yo, xo] = total / wsum
    ours = upsample_flow(torch.from_numpy(low)[None], 4)[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)


# ---- flownet2-pytorch -----------------------------------------------------------------------

def test_flownet2_pytorch_single_net(tmp_path):
    """FlowNet2C: keys without prefix, upsampling with a (zero) bias; a 2017-style legacy pickle."""
    model = random_model("flownet2-c")
    sd = {k.removeprefix("flownetc."): v for k, v in model.state_dict().items()}
    for k in range(6, 2, -1):
        sd[f"upsampled_flow{k}_to_{k - 1}.bias"] = torch.zeros(2)
    path = tmp_path / "FlowNet2-C_checkpoint.pth.tar"
    torch.save({"epoch": 0, "state_dict": sd, "best_EPE": 1e10}, path, _use_new_zipfile_serialization=False)
    assert detect_format(path) == "flownet2-pytorch"
    imported, meta = load_official(path, "flownet2-c")
    assert_same(imported, model)
    assert meta["epoch"] == 0 and meta["best_EPE"] == 1e10


def test_flownet2_pytorch_stack(tmp_path):
    model = random_model("flownet2-css")
    sd = dict(model.state_dict())
    sd["flownetc.upsampled_flow6_to_5.bias"] = torch.zeros(2)
    path = tmp_path / "FlowNet2-CSS_checkpoint.pth.tar"
    torch.save({"epoch": 12, "state_dict": sd, "best_EPE": 2.5}, path)
    imported, meta = load_official(path, "flownet2-css")
    assert_same(imported, model)  # flownet2-pytorch's conv1 weights are RGB already: untouched
    assert meta["epoch"] == 12


def test_flownet2_pytorch_errors(tmp_path):
    model = random_model("flownet2-s")
    sd = {k.removeprefix("flownets."): v for k, v in model.state_dict().items()}
    path = tmp_path / "s.pth.tar"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(InputError, match=r"single network .* flownet2-ss is a stack of 2"):
        load_official(path, "flownet2-ss")
    with pytest.raises(InputError, match=r"parameter 'conv1.0.weight' has shape \(24, 6, 7, 7\); "
                                         r"flownet2-c needs \(24, 3, 7, 7\)"):
        load_official(path, "flownet2-c")
    torch.save({"state_dict": {**sd, "conv1.1.running_mean": torch.zeros(24)}}, path)
    with pytest.raises(InputError, match=r"'conv1.1.running_mean' has no place in flownet2-s"):
        load_official(path, "flownet2-s")
    bad = model.state_dict()
    bad["flownets.upsampled_flow6_to_5.bias"] = torch.ones(2)
    torch.save({"state_dict": bad}, path)
    with pytest.raises(InputError, match="non-zero bias"):
        load_official(path, "flownet2-s")
    torch.save({"state_dict": sd}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(InputError, match=r"s.pth.tar: not a readable PyTorch checkpoint"):
        load_official(path, "flownet2-s")


# ---- errors ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s_layers():
    return caffe_layers(random_model("flownet2-s"))


def test_truncated_caffemodel(tmp_path, s_layers):
    data = caffemodel_bytes(s_layers)
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(data[:len(data) * 2 // 3])
    out = tmp_path / "out.pt"
    with pytest.raises(InputError, match=r"cut.caffemodel: truncated or corrupt .caffemodel in layer '\w+'"):
        import_weights(path, "flownet2-s", out)
    assert list(tmp_path.iterdir()) == [path]  # nothing written, not even a temporary file
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="cut.caffemodel"):
        load_official(path, "flownet2-s")


def test_truncated_h5(tmp_path, s_layers):
    path = tmp_path / "cut.caffemodel.h5"
    write_h5(path, s_layers)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(InputError, match=r"cut.caffemodel.h5: truncated or corrupt HDF5 file"):
        load_official(path, "flownet2-s")


def test_wrong_model_and_shapes(tmp_path, s_layers):
    path = tmp_path / "s.caffemodel"
    path.write_bytes(caffemodel_bytes(s_layers))
    with pytest.raises(InputError, match=r"s.caffemodel: layer 'conv1' blob 0 has shape \(24, 6, 7, 7\); "
                                         r"flownet2-c needs \(24, 3, 7, 7\) for flownetc.conv1.0.weight"):
        load_official(path, "flownet2-c")
    with pytest.raises(InputError, match=r"no layer 'net2_\w+' for flownet2-ss's flownets_1\.\w+\.0\.weight "
                                         r"\(.*\) \(and 41 more\): the file is incomplete or for another model"):
        load_official(path, "flownet2-ss")
    with pytest.raises(InputError, match=r"layer 'conv1' blob 0 has shape \(24, 6, 7, 7\); flownet2-S needs"):
        load_official(path, "flownet2-S")
    css = tmp_path / "css.caffemodel"
    css.write_bytes(caffemodel_bytes(caffe_layers(random_model("flownet2-css"))))
    with pytest.raises(InputError, match=r"layer 'net3_conv1' has no place in flownet2-cs"):
        load_official(css, "flownet2-cs")
    layers = [(n, t, [np.zeros((96, 48, 4, 4)), b[1]]) if n == "deconv3" else (n, t, b) for n, t, b in s_layers]
    path.write_bytes(caffemodel_bytes(layers))
    with pytest.raises(InputError, match=r"layer 'deconv3' blob 0 has shape \(96, 48, 4, 4\); flownet2-s needs"):
        load_official(path, "flownet2-s")
    layers = [(n, t, [b[0], np.ones(2)]) if n == "upsample_flow4to3" else (n, t, b) for n, t, b in s_layers]
    path.write_bytes(caffemodel_bytes(layers))
    with pytest.raises(InputError, match=r"layer 'upsample_flow4to3' has a non-zero bias"):
        load_official(path, "flownet2-s")
    layers = [(n, "Deconvolution", b) if n == "conv2" else (n, t, b) for n, t, b in s_layers]
    path.write_bytes(caffemodel_bytes(layers))
    with pytest.raises(InputError, match=r"layer 'conv2' is a Deconvolution"):
        load_official(path, "flownet2-s")


def test_cli_error_is_one_line(tmp_path, capsys, s_layers):
    path = tmp_path / "s.caffemodel"
    path.write_bytes(caffemodel_bytes(s_layers))
    out = tmp_path / "c.pt"
    assert main(["import-weights", str(path), "--model", "flownet2-c", "-o", str(out)]) == InputError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and err.count("\n") == 1 and "'conv1'" in err
    assert not out.exists()


# ---- the official deploy prototxts ----------------------------------------------------------

def parse_prototxt(text: str) -> dict:
    """Protobuf text format -> {key: [value or nested dict, ...]}."""
    tokens = re.findall(r'"[^"]*"|[{}:]|[^\s{}:"]+', text)

    def block(i: int):
        out: dict = {}
        while i < len(tokens) and tokens[i] != "}":
            k = tokens[i]
            if tokens[i + 1] == ":":
                value, i = tokens[i + 2].strip('"'), i + 3
            else:  # "{"
                value, i = block(i + 2)
                i += 1
            out.setdefault(k, []).append(value)
        return out, i

    return block(0)[0]


def prototxt_convolutions(text: str) -> dict[str, tuple]:
    """{layer: (type, weight shape as Caffe stores it, stride, pad)} of every Convolution and
    Deconvolution, input channels found by following blob channels through the graph."""
    channels = {"img0": 3, "img1": 3}
    convs = {}
    for layer in parse_prototxt(text)["layer"]:
        name, kind = layer["name"][0], layer["type"][0]
        cin = [channels[b] for b in layer.get("bottom", [])]
        tops = layer.get("top", [])
        if kind in ("Convolution", "Deconvolution"):
            p = layer["convolution_param"][0]
            n, k = int(p["num_output"][0]), int(p["kernel_size"][0])
            assert len(set(cin)) == 1, name
            shape = (n, cin[0], k, k) if kind == "Convolution" else (cin[0], n, k, k)
            convs[name] = (kind, shape, int(p.get("stride", ["1"])[0]), int(p.get("pad", ["0"])[0]))
            out = n
        elif kind == "Concat":
            out = sum(cin)
        elif kind == "Correlation":
            p = layer["correlation_param"][0]
            out = (2 * (int(p["max_displacement"][0]) // int(p["stride_2"][0])) + 1) ** 2
        elif kind == "ChannelNorm":
            out = 1
        else:  # Eltwise, ReLU, DataAugmentation, Resample, FlowWarp, Accum: channels of bottom 0
            out = cin[0]
        for top in tops:
            channels[top] = out
    return convs


@pytest.mark.parametrize("template,name", [
    ("FlowNet2-s", "flownet2-s"), ("FlowNet2-ss", "flownet2-ss"), ("FlowNet2-c", "flownet2-c"),
    ("FlowNet2-cs", "flownet2-cs"), ("FlowNet2-css", "flownet2-css"), ("FlowNet2-css-ft-sd", "flownet2-css"),
    ("FlowNet2-S", "flownet2-S"), ("FlowNet2-C", "flownet2-C")])
def test_official_prototxt_maps_one_to_one(template, name):
    """Every Convolution/Deconvolution of the official deploy net (but `scale_conv1`, the
    output's size rescale) is exactly one of our layers, with the same shape, stride and pad."""
    path = REFERENCE / f"{template}_deploy.prototxt.template"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    s = spec(name)
    model = FlowNet2(s.stages, s.width)
    convs = prototxt_convolutions(path.read_text())
    mapping = caffe.layer_map(s.stages)
    assert official_names(s.stages, s.width) == {mapping[n]: n for n in convs if n not in caffe.IGNORED_LAYERS}
    for layer, (kind, shape, stride, pad) in convs.items():
        if layer in caffe.IGNORED_LAYERS:
            continue
        module = model.get_submodule(mapping[layer])
        assert type(module).__name__ == ("Conv2d" if kind == "Convolution" else "ConvTranspose2d"), layer
        assert tuple(module.weight.shape) == shape, layer
        assert module.stride == (stride, stride) and module.padding == (pad, pad), layer
        out_channels = shape[0] if kind == "Convolution" else shape[1]
        if ".upsampled_flow" in mapping[layer]:
            assert module.bias is None
        else:
            assert tuple(module.bias.shape) == (out_channels,), layer
    n_modules = sum(1 for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)))
    assert n_modules == len(convs) - 1
