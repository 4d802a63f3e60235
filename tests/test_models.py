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
    with pytest.raises(ValueError, match="multiple of 64"):
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


def warp_loops(img, flow):
    """Caffe's FlowWarp: bilinear, neighbours outside the image count as zero."""
    b, c, h, w = img.shape
    out = np.zeros_like(img, dtype=np.float64)
    for n in range(b):
        for y in range(h):
            for x in range(w):
                fx, fy = x + flow[n, 0, y, x], y + flow[n, 1, y, x]
                x0, y0 = int(np.floor(fx)), int(np.floor(fy))
                ax, ay = fx - x0, fy - y0
                for yy, wy in ((y0, 1 - ay), (y0 + 1, ay)):
                    for xx, wx in ((x0, 1 - ax), (x0 + 1, ax)):
                        if 0 <= xx < w and 0 <= yy < h:
                            out[n, :, y, x] += wy * wx * img[n, :, yy, xx]
    return out


def test_warp_against_loops(rng):
    img = rng.standard_normal((2, 3, 7, 9)).astype(np.float32)
    flow = (rng.standard_normal((2, 2, 7, 9)) * 3).astype(np.float32)
    got = warp_reference(torch.from_numpy(img), torch.from_numpy(flow)).numpy()
    np.testing.assert_allclose(got, warp_loops(img, flow), atol=1e-5)
    np.testing.assert_array_equal(warp(torch.from_numpy(img), torch.from_numpy(flow)).numpy(), got)


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
