"""FlowNet2 family: shapes, parameter counts, names, reference ops against loop versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeflow.errors import InputError
from edgeflow.models import create, names
from edgeflow.models.flownet import FlowNetC, FlowNetS
from edgeflow.models.ops import correlation, correlation_reference, warp, warp_reference


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts():
    assert abs(n_params(FlowNetS(6, 1.0)) / 1e6 - 38.68) < 0.01
    assert abs(n_params(FlowNetS(6, 0.375)) / 1e6 - 5.46) < 0.01
    # FlowNetC differs from FlowNetS only in conv_redir and conv3_1's 441 correlation inputs.
    assert n_params(FlowNetC(1.0)) > n_params(FlowNetS(6, 1.0))


@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("size", [(64, 64), (128, 192)])
def test_forward_shapes(name, size):
    torch.manual_seed(0)
    model = create(name, weights=None)
    a = torch.rand(2, 3, *size)
    b = torch.rand(2, 3, *size)
    with torch.no_grad():
        flow = model(a, b)
    assert flow.shape == (2, 2, *size)
    assert torch.isfinite(flow).all()


def test_forward_shape_large():
    model = create("flownet2-s", weights=None)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 384, 512), torch.rand(1, 3, 384, 512)).shape == (1, 2, 384, 512)


def test_flownet2_pytorch_names():
    keys = set(create("flownet2-css", weights=None).state_dict())
    for k in ("flownetc.conv1.0.weight", "flownetc.conv_redir.0.weight", "flownetc.conv3_1.0.weight",
              "flownetc.predict_flow6.weight", "flownetc.upsampled_flow6_to_5.weight",
              "flownets_1.deconv5.0.weight", "flownets_2.predict_flow2.bias"):
        assert k in keys, k
    assert create("flownet2-css", weights=None).flownets_1.conv1[0].weight.shape[1] == 12
    assert create("flownet2-c", weights=None).flownetc.conv3_1[0].weight.shape[1] == 12 + 441


def test_bad_size_and_name():
    with pytest.raises(InputError, match="multiple of 64"):
        create("flownet2-s", weights=None)(torch.rand(1, 3, 100, 64), torch.rand(1, 3, 100, 64))
    with pytest.raises(InputError, match="flownet2-s"):
        create("flownet9")


def correlation_loops(f1, f2, k, md, s1, s2, pad):
    """Caffe's correlation_forward, written as plain loops over the padded inputs."""
    b, c, h, w = f1.shape
    p1 = np.pad(f1, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    p2 = np.pad(f2, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kr = (k - 1) // 2
    border = md + kr
    oh = int(np.ceil((h + 2 * pad - 2 * border) / s1))
    ow = int(np.ceil((w + 2 * pad - 2 * border) / s1))
    r = md // s2
    g = 2 * r + 1
    out = np.zeros((b, g * g, oh, ow), np.float64)
    for n in range(b):
        for i in range(oh):
            for j in range(ow):
                y1, x1 = i * s1 + md, j * s1 + md
                for p in range(-r, r + 1):
                    for o in range(-r, r + 1):
                        acc = 0.0
                        for ky in range(k):
                            for kx in range(k):
                                acc += float(np.dot(p1[n, :, y1 + ky, x1 + kx],
                                                    p2[n, :, y1 + ky + p * s2, x1 + kx + o * s2]))
                        out[n, (p + r) * g + (o + r), i, j] = acc / (k * k * c)
    return out


@pytest.mark.parametrize("k,md,s1,s2,pad", [(1, 4, 1, 2, 4), (3, 2, 1, 1, 3), (1, 3, 2, 1, 3), (3, 4, 2, 2, 5)])
def test_correlation_against_loops(rng, k, md, s1, s2, pad):
    f1 = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
    f2 = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
    want = correlation_loops(f1, f2, k, md, s1, s2, pad)
    got = correlation_reference(torch.from_numpy(f1), torch.from_numpy(f2), k, md, s1, s2, pad).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    op = correlation(torch.from_numpy(f1), torch.from_numpy(f2), k, md, s1, s2, pad).numpy()
    np.testing.assert_array_equal(op, got)


def test_correlation_peaks_at_translation(rng):
    """Features shifted by (dy, dx) = (4, -2) correlate best in that displacement's channel."""
    f1 = torch.from_numpy(rng.standard_normal((1, 16, 24, 24)).astype(np.float32))
    f2 = torch.roll(f1, shifts=(4, -2), dims=(2, 3))
    out = correlation_reference(f1, f2, 1, 6, 1, 2, 6)
    r, g = 3, 7
    center = out[0, :, 8:16, 8:16].mean((1, 2))
    assert int(center.argmax()) == (2 + r) * g + (-1 + r)


def caffe_flow_warp(img, flow):
    """Port of Caffe's FlowWarpLayer::Forward_cpu (lmb-freiburg/flownet2,
    src/caffe/layers/flow_warp_layer.cpp; fill_value ZERO, the default), in float32 as Caffe."""
    f32 = np.float32
    num, channels, height, width = img.shape
    out = np.zeros(img.shape, f32)
    for n in range(num):
        for x in range(width):
            for y in range(height):
                x2 = f32(x) + f32(flow[n, 0, y, x])
                y2 = f32(y) + f32(flow[n, 1, y, x])
                if x2 >= 0 and y2 >= 0 and x2 < width and y2 < height:
                    ix2_l, iy2_t = int(x2), int(y2)
                    ix2_r, iy2_b = min(ix2_l + 1, width - 1), min(iy2_t + 1, height - 1)
                    alpha, beta = x2 - f32(ix2_l), y2 - f32(iy2_t)
                    for c in range(channels):
                        tl, tr = f32(img[n, c, iy2_t, ix2_l]), f32(img[n, c, iy2_t, ix2_r])
                        bl, br = f32(img[n, c, iy2_b, ix2_l]), f32(img[n, c, iy2_b, ix2_r])
                        out[n, c, y, x] = ((f32(1) - alpha) * (f32(1) - beta) * tl + alpha * (f32(1) - beta) * tr
                                           + (f32(1) - alpha) * beta * bl + alpha * beta * br)
    return out


def border_points(h: int, w: int) -> list[tuple[float, float]]:
    """Sample points (x2, y2) at FlowWarp's borders for an h x w image: just outside each border,
    exactly on the first/last row and column, within the last pixel (right/bottom neighbour
    clamped), corners, inside, far away and NaN."""
    e = 1e-3
    mid_x, mid_y = w / 2 - 0.75, h / 2 - 0.25
    return [(-0.5, mid_y), (-e, mid_y), (-1.0, mid_y), (0.0, mid_y), (w - 0.5, mid_y), (w - e, mid_y),
            (w - 1.0, mid_y), (w, mid_y), (w + 0.25, mid_y),
            (mid_x, -0.5), (mid_x, -e), (mid_x, 0.0), (mid_x, h - 0.5), (mid_x, h - e), (mid_x, h - 1.0),
            (mid_x, h), (mid_x, h + 0.25),
            (w - 1.0, h - 1.0), (w - 0.5, h - 0.5), (w - 0.25, h - 1.0), (w - 1.0, h - 0.75),
            (-0.5, h - 0.5), (w - 0.5, -0.5), (0.0, 0.0), (0.5, 0.5), (w - 1.5, h - 1.5),
            (mid_x, mid_y), (1e3, -1e3), (float("nan"), mid_y), (mid_x, float("nan"))]


def border_flow(b: int, h: int, w: int) -> np.ndarray:
    """Flow [b, 2, h, w] sending pixel k (row-major) to border_points()[k % len], float32."""
    pts = border_points(h, w)
    flow = np.zeros((b, 2, h, w), np.float32)
    for k in range(h * w):
        y, x = divmod(k, w)
        px, py = pts[(k + y) % len(pts)]
        flow[:, 0, y, x], flow[:, 1, y, x] = px - x, py - y
    return flow


def test_warp_matches_caffe_flowwarp(rng):
    img = rng.standard_normal((2, 3, 7, 9)).astype(np.float32)
    flow = (rng.standard_normal((2, 2, 7, 9)) * 3).astype(np.float32)
    flow[1] = border_flow(1, 7, 9)[0]
    got = warp_reference(torch.from_numpy(img), torch.from_numpy(flow)).numpy()
    np.testing.assert_array_equal(got, caffe_flow_warp(img, flow))
    np.testing.assert_array_equal(warp(torch.from_numpy(img), torch.from_numpy(flow)).numpy(), got)


@pytest.mark.parametrize("h,w", [(5, 6), (4, 11)])
def test_warp_border_cases(h, w):
    """Every border point of FlowWarp, and the values Caffe gives at a few of them."""
    img = np.arange(2 * h * w, dtype=np.float32).reshape(1, 2, h, w) + 1
    flow = border_flow(1, h, w)
    got = warp_reference(torch.from_numpy(img), torch.from_numpy(flow)).numpy()
    np.testing.assert_array_equal(got, caffe_flow_warp(img, flow))

    def at(x2, y2):
        """The warped value at pixel (0, 0) when its flow points to (x2, y2)."""
        fl = np.zeros((1, 2, h, w), np.float32)
        fl[0, :, 0, 0] = x2, y2
        return warp_reference(torch.from_numpy(img), torch.from_numpy(fl)).numpy()[0, :, 0, 0]

    y = 2
    assert (at(-0.5, y) == 0).all() and (at(-1e-3, y) == 0).all()  # outside: 0, not half of column 0
    np.testing.assert_array_equal(at(0.0, y), img[0, :, y, 0])
    np.testing.assert_array_equal(at(w - 0.5, y), img[0, :, y, w - 1])  # right neighbour clamped
    np.testing.assert_array_equal(at(w - 1.0, y), img[0, :, y, w - 1])
    assert (at(w, y) == 0).all() and (at(w + 0.25, y) == 0).all()
    np.testing.assert_array_equal(at(1, h - 0.5), img[0, :, h - 1, 1])  # bottom neighbour clamped
    assert (at(1, h) == 0).all() and (at(1, -0.5) == 0).all()
    np.testing.assert_array_equal(at(w - 0.5, h - 0.5), img[0, :, h - 1, w - 1])
    np.testing.assert_allclose(at(1.25, 1.5), 0.375 * img[0, :, 1, 1] + 0.125 * img[0, :, 1, 2]
                               + 0.375 * img[0, :, 2, 1] + 0.125 * img[0, :, 2, 2], rtol=1e-6)
    assert (at(float("nan"), 1) == 0).all()


def test_warp_gradients_through_recompute():
    """The custom op's autograd (re-running warp_reference) against finite differences, with
    sample points inside, within the last column/row (clamped) and outside."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    frac = torch.rand(1, 2, 5, 6, generator=g, dtype=torch.float64) * 0.6 + 0.2  # away from kinks
    flow = (torch.randint(-2, 3, (1, 2, 5, 6), generator=g).double() + frac)
    flow[0, 0, :, -1] = frac[0, 0, :, -1]  # x2 in (W-1, W): right neighbour clamped
    flow[0, 1, -1, :] = frac[0, 1, -1, :]
    flow[0, 0, :, 0] = -frac[0, 0, :, 0]  # x2 < 0: outside
    flow.requires_grad_()
    assert torch.autograd.gradcheck(warp, (img, flow))

def test_warp_integer_translation(rng):
    img = torch.from_numpy(rng.standard_normal((1, 2, 10, 12)).astype(np.float32))
    flow = torch.zeros(1, 2, 10, 12)
    flow[:, 0], flow[:, 1] = 3.0, -2.0
    out = warp_reference(img, flow)
    # out(y, x) = img(y - 2, x + 3) where inside, else 0
    torch.testing.assert_close(out[0, :, 2:, :9], img[0, :, :8, 3:])
    assert out[0, :, :2].abs().max() == 0 and out[0, :, :, 9:].abs().max() == 0


def test_custom_ops_survive_export():
    model = create("flownet2-cs", weights=None)
    ep = torch.export.export(model, (torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "edgeflow.correlation.default" in targets
    assert "edgeflow.warp.default" in targets


def test_ops_have_gradients(rng):
    f1 = torch.rand(1, 4, 8, 8, requires_grad=True)
    f2 = torch.rand(1, 4, 8, 8, requires_grad=True)
    correlation(f1, f2, 1, 2, 1, 1, 2).sum().backward()
    assert f1.grad is not None and f2.grad.abs().sum() > 0
    img = torch.rand(1, 3, 8, 8, requires_grad=True)
    flow = (torch.rand(1, 2, 8, 8) * 2).requires_grad_()
    warp(img, flow).sum().backward()
    assert img.grad.abs().sum() > 0 and flow.grad.abs().sum() > 0


def caffe_accum(bottom, top_h, top_w):
    """Port of Caffe's AccumLayer::Forward_cpu with one bottom and a reference blob of size
    top_h x top_w (lmb-freiburg/flownet2, src/caffe/layers/accum_layer.cpp), in float32."""
    f32 = np.float32
    num, channels, bh, bw = bottom.shape
    data = np.append(bottom.astype(f32).reshape(-1), f32(0))  # Caffe reads [count] with weight 0
    count = bottom.size
    out = np.zeros((num, channels, top_h, top_w), f32)
    for n in range(num):
        for c in range(channels):
            cn = n * channels + c
            for h in range(top_h):
                for w in range(top_w):
                    xpos = f32(w) / f32(top_w - 1) * f32(bw - 1)
                    ypos = f32(h) / f32(top_h - 1) * f32(bh - 1)
                    tlx, tly = np.floor(xpos), np.floor(ypos)
                    off = int(bw * (bh * cn + tly) + tlx)
                    tl, tr = data[off], data[min(off + 1, count)]
                    bl, br = data[min(off + bw, count)], data[min(off + 1 + bw, count)]
                    xd, yd = xpos - tlx, ypos - tly
                    out[n, c, h, w] = ((f32(1) - xd) * (f32(1) - yd) * tl + xd * yd * br
                                       + (f32(1) - xd) * yd * bl + xd * (f32(1) - yd) * tr)
    return out


def test_accum_upsample_matches_caffe(rng):
    """Between stages, Caffe's Accum (corner-aligned) brings flow2 to the image size."""
    from edgeflow.models.stack import accum_upsample

    low = rng.standard_normal((2, 2, 4, 5)).astype(np.float32)
    got = accum_upsample(torch.from_numpy(low), (16, 20)).numpy()
    want = caffe_accum(low, 16, 20)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[..., 0, 0], low[..., 0, 0])  # corners coincide
    np.testing.assert_array_equal(got[..., -1, -1], low[..., -1, -1])


@pytest.mark.parametrize("name", ["flownet2-ss", "flownet2-cs"])
def test_stage_glue_matches_caffe(name):
    """What a stacked stage sees, as the Caffe stack builds it (Eltwise x20, Accum, FlowWarp,
    Eltwise img0 - warped, ChannelNorm, Eltwise x0.05, Concat), from the previous stage's flow2."""
    from edgeflow.models.stack import accum_upsample

    torch.manual_seed(0)
    model = create(name, weights=None)
    with torch.no_grad():  # larger flows, so that warping reaches the borders
        model.get_submodule(model.names[0]).predict_flow2.weight.mul_(40)
    seen = {}
    model.get_submodule(model.names[0]).register_forward_hook(lambda m, i, o: seen.update(flow2=o[0]))
    model.get_submodule(model.names[1]).register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    g = torch.Generator().manual_seed(0)
    img1 = torch.rand(1, 3, 64, 128, generator=g)
    img2 = torch.roll(img1, (2, -3), (2, 3))
    with torch.no_grad():
        model(img1, img2)
    x = seen["x"].numpy()
    images = model.normalize(img1, img2).numpy()
    flow2 = seen["flow2"].numpy()
    flow = accum_upsample(torch.from_numpy(flow2 * np.float32(20.0)), (64, 128)).numpy()
    # Accum rounds its sample points x/(W-1)*(w-1) differently from torch's x*((w-1)/(W-1)):
    # both are float32 roundings of the same bilinear map (here within 1e-5 of the flow's range)
    np.testing.assert_allclose(flow, caffe_accum(flow2 * np.float32(20.0), 64, 128),
                               rtol=0, atol=1e-5 * float(np.abs(flow).max()))
    warped = caffe_flow_warp(images[:, 3:6], flow)
    assert np.abs(flow).max() > 5 and (warped == 0).any()  # some points outside
    np.testing.assert_array_equal(x[:, :6], images)
    np.testing.assert_array_equal(x[:, 6:9], warped)
    np.testing.assert_array_equal(x[:, 9:11], flow * np.float32(0.05))
    norm = np.sqrt(((images[:, :3] - warped) ** 2).sum(1, keepdims=True))
    np.testing.assert_allclose(x[:, 11:], norm, rtol=1e-6, atol=1e-6)  # ours adds 1e-12 under the root


MEAN = {"img1": [0.45, 0.432, 0.411], "img2": [0.431, 0.41, 0.39]}


def test_fixed_input_mean():
    from edgeflow.models.stack import FlowNet2

    g = torch.Generator().manual_seed(0)
    img1, img2 = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    own = FlowNet2("s", 0.375).normalize(img1, img2)
    pair_mean = (img1.mean((2, 3), keepdim=True) + img2.mean((2, 3), keepdim=True)) / 2
    torch.testing.assert_close(own, torch.cat((img1, img2), 1) - pair_mean.repeat(1, 2, 1, 1))
    fixed = FlowNet2("s", 0.375, input_mean=(MEAN["img1"], MEAN["img2"]))
    x = fixed.normalize(img1, img2)
    assert torch.equal(x[:, :3], img1 - torch.tensor(MEAN["img1"]).view(1, 3, 1, 1))
    assert torch.equal(x[:, 3:], img2 - torch.tensor(MEAN["img2"]).view(1, 3, 1, 1))
    with pytest.raises(InputError, match="two RGB triples"):
        FlowNet2("s", 0.375, input_mean=([0.5, 0.5], [0.5, 0.5, 0.5]))


def test_create_applies_caffe_mean(tmp_path):
    """A weight file imported from Caffe carries the official means in its meta (the key the
    Caffe converter writes); create() makes the model subtract them, and only then."""
    from edgeflow.models import caffe
    from edgeflow.models.weights import save

    mean_layers = [caffe.CaffeLayer(name, "DataAugmentation",
                                    [np.full((1, 1, 1, 1), 1001.0, np.float32), np.zeros((1, 3, 4, 4), np.float32),
                                     np.array(MEAN[image][::-1], np.float32).reshape(1, 3, 1, 1)])
                   for name, image in zip(caffe.MEAN_LAYERS, ("img1", "img2"))]
    _entries, meta = caffe.convert(mean_layers, "s", "x.caffemodel", "flownet2-s")
    torch.manual_seed(0)
    source = create("flownet2-s", weights=None)
    save(source, "flownet2-s", tmp_path / "caffe.pt", meta=meta, half=False)
    save(source, "flownet2-s", tmp_path / "own.pt", meta={"epoch": 3}, half=False)
    imported = create("flownet2-s", weights=tmp_path / "caffe.pt")
    np.testing.assert_allclose(imported.input_mean, (MEAN["img1"], MEAN["img2"]), atol=1e-6)
    assert create("flownet2-s", weights=tmp_path / "own.pt").input_mean is None
    assert create("flownet2-s", weights=None).input_mean is None
    g = torch.Generator().manual_seed(1)
    img1 = torch.rand(1, 3, 64, 64, generator=g)
    img2 = torch.roll(img1, 2, 3)
    with torch.no_grad():
        want = source.flownets(torch.cat((img1, img2), 1) - torch.tensor(MEAN["img1"] + MEAN["img2"]).view(1, 6, 1, 1))
        torch.testing.assert_close(imported(img1, img2), torch.nn.functional.interpolate(
            want[0] * 20, scale_factor=4, mode="bilinear", align_corners=False), rtol=1e-5, atol=1e-5)
    save(source, "flownet2-s", tmp_path / "bad.pt", meta={"caffe_mean_rgb": {"img1": [0.5, 0.5, 0.5]}}, half=False)
    with pytest.raises(InputError, match="caffe_mean_rgb"):
        create("flownet2-s", weights=tmp_path / "bad.pt")
