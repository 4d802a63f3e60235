"""CPU schedules: every FlowNet convolution gets the register-tiled parallel schedule, numerics hold."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.tvm
SIZE = (64, 128)


def _prepared(name):
    """(torch model, prepared Relax module, its params) of `name` with random weights."""
    import torch

    from edgeflow.compile import frontend, lower
    from edgeflow.models import create

    torch.manual_seed(0)
    model = create(name, weights=None)
    rm = frontend.to_relax(model, SIZE)
    mod, params, _ = lower.prepare(rm.mod, rm.params, rm.param_names)
    return model, mod, params


def _scheduled(mod, board):
    """The TIR of `mod` as `lower.build` schedules it for the CPU `board`."""
    from tvm import relax

    from edgeflow.compile import cpu_schedules, lower
    from edgeflow.targets import get

    board = get(board)
    target = board.tvm_target()
    with target:
        mod = cpu_schedules.legalize(mod)
        mod = relax.get_pipeline("zero")(mod)
        mod = lower._apply_hand_schedules(mod, target, board)
        return cpu_schedules.schedule(mod)


def _walk(func, node_type) -> list:
    """The nodes of `node_type` in a PrimFunc's body."""
    import tvm_ffi

    found = []
    tvm_ffi.structural_walk(func.body, [(node_type, found.append)])
    return found


def _loops(func) -> dict:
    """{loop kind: count} of a PrimFunc."""
    from tvm import tirx

    kinds: dict = {}
    for loop in _walk(func, tirx.For):
        kind = tirx.ForKind(int(loop.kind)).name.lower()
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _blocks(func) -> list[str]:
    from tvm import s_tir

    return [b.name_hint for b in _walk(func, s_tir.SBlock)]


@pytest.fixture(scope="module")
def flownet2_s():
    return _prepared("flownet2-s")


def test_every_convolution_is_register_tiled_and_parallel(flownet2_s):
    from tvm import s_tir, tirx

    from edgeflow.compile import cpu_schedules as cs

    _, mod, _ = flownet2_s
    tir = _scheduled(mod, "host")
    convs = deconvs = 0
    kernels = set()
    for gv, func in tir.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        blocks = _blocks(func)
        assert "data_dilate" not in blocks and "conv2d_nchw" not in blocks, gv  # none left to TOPI
        assert func.attrs.get("tirx.is_scheduled"), f"{gv.name_hint} was not scheduled"
        loops = _loops(func)
        if cs.CONV + "_update" in blocks or cs.DECONV + "_update" in blocks:
            deconv = cs.DECONV + "_update" in blocks
            deconvs, convs = deconvs + deconv, convs + (not deconv)
            # the reduction was split off its init and accumulates in a local buffer
            assert any(b.endswith("_local") for b in blocks), gv
            # one parallel region: blocks of rows, each padding its input rows, then convolving
            assert loops.get("parallel", 0) == 1, (gv, loops)
            (par,) = [lp for lp in _walk(func, tirx.For) if int(lp.kind) == int(tirx.ForKind.PARALLEL)]
            inside = [b.name_hint for b in _walk(par, s_tir.SBlock)]
            assert (cs.DECONV_PAD if deconv else cs.PAD) in inside, gv
            assert loops.get("vectorized", 0) >= 1 and loops.get("unrolled", 0) >= 2, (gv, loops)
            if not deconv:
                w = [p for p in func.params if "weight" in p.name][0]
                kernels.add(int(w.shape[2]))
    # flownet2-s: 10 encoder convs + 5 flow predictions; 4 deconvs + 4 flow upsamplings
    assert convs == 15 and deconvs == 8
    assert kernels == {7, 5, 3}


def test_register_tile_fits_the_registers():
    from edgeflow.compile.cpu_schedules import register_tile

    for lanes, regs in ((16, 32), (8, 16), (4, 32)):
        for channels in (2, 24, 96, 192, 386):
            for width in (8, 16, 24, 64, 256, 7):
                f, v, w = register_tile(channels, width, lanes, regs)
                assert channels % f == 0 and width % (v * w) == 0 and w <= lanes
                assert f * v <= regs - 4
    assert register_tile(24, 256, 16, 32) == (6, 4, 16)  # conv1 on AVX-512
    assert register_tile(2, 64, 4, 32) == (2, 4, 4)  # a flow prediction on NEON


def test_row_blocks_share_evenly():
    from edgeflow.compile.cpu_schedules import row_blocks

    assert [row_blocks(r) for r in (192, 96, 48, 24, 12, 6, 7, 1)] == [24, 24, 24, 24, 12, 6, 7, 1]
    assert row_blocks(100) == 20 and 100 % row_blocks(100) == 0


def _run(mod, params, board="host"):
    import tvm
    from tvm import relax

    from edgeflow.compile import lower
    from edgeflow.targets import get

    ex, _ = lower.build(mod, get(board))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    a = rng.random((1, 3, *SIZE), dtype=np.float32)
    b = np.roll(a, (1, 3), axis=(2, 3))
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), *[tvm.runtime.tensor(p) for p in params])
    return a, b, (got[0] if not hasattr(got, "numpy") else got).numpy()


def _epe(x, y):
    return float(np.sqrt(((x - y) ** 2).sum(1)).mean())


@pytest.mark.parametrize("name", ["flownet2-s", "flownet2-css"])
def test_scheduled_build_matches_torch(name, flownet2_s):
    import torch

    model, mod, params = flownet2_s if name == "flownet2-s" else _prepared(name)
    a, b, got = _run(mod, params)
    with torch.no_grad():
        want = model(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert np.abs(want).mean() > 1e-3  # random weights still give a non-trivial flow
    assert _epe(got, want) < 0.01


def test_aarch64_build_uses_neon_vectors(flownet2_s):
    from tvm import tirx

    from edgeflow.compile import lower
    from edgeflow.targets import get

    _, mod, _ = flownet2_s
    widths = {int(loop.extent) for _gv, func in _scheduled(mod, "aarch64-cpu").functions_items()
              if isinstance(func, tirx.PrimFunc) for loop in _walk(func, tirx.For)
              if int(loop.kind) == int(tirx.ForKind.VECTORIZED)}
    assert widths and max(widths) == 4  # 128-bit NEON: 4 fp32 lanes
    ex, code = lower.build(mod, get("aarch64-cpu"))  # cross-compiles (export needs the cross cc)
    assert code is None and ex is not None


CASES = [  # (kind, input shape, weight shape, stride, padding, groups, output_padding)
    ("conv", (1, 5, 9, 13), (8, 5, 3, 3), 2, 1, 1, 0),  # odd sizes: no full vector
    ("conv", (2, 4, 16, 32), (6, 4, 1, 1), 1, 0, 1, 0),
    ("conv", (1, 3, 20, 24), (5, 3, 7, 7), 2, 3, 1, 0),
    ("conv", (1, 4, 8, 8), (4, 2, 3, 3), 1, 1, 2, 0),  # grouped: TVM's compute
    ("deconv", (1, 6, 5, 7), (6, 3, 4, 4), 2, 1, 1, 0),
    ("deconv", (1, 4, 6, 6), (4, 2, 3, 3), 2, 1, 1, 1),  # kernel not a multiple of the stride
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_convolutions_match_torch(case):
    import torch
    import tvm
    from tvm import relax

    from edgeflow.compile import cpu_schedules as cs
    from edgeflow.compile import lower
    from edgeflow.targets import get

    kind, xshape, wshape, stride, pad, groups, out_pad = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal(xshape).astype(np.float32)
    w = rng.standard_normal(wshape).astype(np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(list(xshape), "float32"))
    wv = relax.Var("w", relax.TensorType(list(wshape), "float32"))
    with bb.function("main", [xv, wv]):
        with bb.dataflow():
            if kind == "conv":
                y = relax.op.nn.conv2d(xv, wv, strides=stride, padding=pad, groups=groups)
            else:
                y = relax.op.nn.conv2d_transpose(xv, wv, strides=stride, padding=pad, output_padding=out_pad)
            out = bb.emit_output(relax.op.nn.leakyrelu(y, 0.1))
        bb.emit_func_output(out)
    mod = bb.get()
    ours = groups == 1 and (kind == "conv" or wshape[2] % stride == 0)
    assert (f'"{cs.CONV}"' in cs.legalize(mod).script() or f'"{cs.DECONV}"' in cs.legalize(mod).script()) == ours
    ex, _ = lower.build(mod, get("host"))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    if kind == "conv":
        want = torch.nn.functional.conv2d(tx, tw, stride=stride, padding=pad, groups=groups)
    else:
        want = torch.nn.functional.conv_transpose2d(tx, tw, stride=stride, padding=pad, output_padding=out_pad)
    want = torch.nn.functional.leaky_relu(want, 0.1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_winograd_weights_invert_exactly(rng):
    from edgeflow.compile.cpu_schedules import WINOGRAD_G, winograd_weights_inverse

    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)  # [F, C, 3, 3]
    g = np.array(WINOGRAD_G, np.float32)
    u = np.einsum("ik,fckl,jl->ijcf", g, w, g)  # G w G^T as [4, 4, C, F]
    assert np.abs(winograd_weights_inverse(u) - w).max() < 1e-5


def test_winograd_convolutions_in_flownet2_s():
    """At 128x256 conv3_1 (96 channels in and out, 16x32) is the one convolution wide enough:
    its Winograd weights are in the package's parameters, its PrimFunc is scheduled by `Winograd`
    (one parallel region), the flow is torch's, and the torch weight comes back from them."""
    import torch
    import tvm
    from tvm import relax, tirx

    from edgeflow.compile import cpu_schedules as cs
    from edgeflow.compile import frontend, lower
    from edgeflow.models import create
    from edgeflow.targets import get

    size = (128, 256)
    torch.manual_seed(0)
    model = create("flownet2-s", weights=None).eval()
    rm = frontend.to_relax(model, size)
    mod, params, names = lower.prepare(rm.mod, rm.params, rm.param_names)
    wino = {n: p for n, p in zip(names, params) if p.shape[:2] == (4, 4)}
    assert list(wino) == ["flownets.conv3_1.0.weight"] and wino["flownets.conv3_1.0.weight"].shape == (4, 4, 96, 96)
    want_w = model.state_dict()["flownets.conv3_1.0.weight"].numpy()
    assert np.abs(cs.winograd_weights_inverse(wino["flownets.conv3_1.0.weight"]) - want_w).max() < 1e-5

    funcs = [f for _, f in _scheduled(mod, "host").functions_items()
             if isinstance(f, tirx.PrimFunc) and cs.WINO_M + "_update" in _blocks(f)]
    assert len(funcs) == 1 and funcs[0].attrs.get("tirx.is_scheduled")
    assert _loops(funcs[0]).get("parallel") == 1 and _loops(funcs[0]).get("vectorized", 0) >= 3

    ex, _ = lower.build(mod, get("host"))
    rng = np.random.default_rng(0)
    a = rng.random((1, 3, *size), dtype=np.float32)
    b = np.roll(a, (2, 5), axis=(2, 3))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b),
                                                       *[tvm.runtime.tensor(p) for p in params])
    got = (got[0] if not hasattr(got, "numpy") else got).numpy()
    with torch.no_grad():
        want = model(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert np.abs(want).mean() > 1e-3 and _epe(got, want) < 0.01
