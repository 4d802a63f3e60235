"""CUDA convolutions: deconvolutions split by output phase (exact against torch), tensor cores in
every fp16 convolution of a Jetson package but the narrow flow heads, and the predicted time."""

from __future__ import annotations

import numpy as np
import pytest

from edgeflow import prediction, targets


@pytest.mark.parametrize("size_in,size_out,kernel,stride,pad,plan", [
    (6, 12, 4, 2, 1, (2, [[3, 1], [2, 0]], [0, 1], (1, 1))),  # FlowNet's deconvolutions
    (5, 10, 2, 2, 0, (1, [[0], [1]], [0, 0], (0, 0))),
    (4, 10, 4, 2, 0, (2, [[2, 0], [3, 1]], [0, 0], (1, 1))),
])
def test_phase_plan(size_in, size_out, kernel, stride, pad, plan):
    from edgeflow.compile.cuda_convs import phase_plan

    assert phase_plan(size_in, size_out, kernel, stride, pad) == plan


def test_phase_plan_refuses_what_it_cannot_split():
    from edgeflow.compile.cuda_convs import phase_plan

    assert phase_plan(4, 13, 6, 3, 1) is None  # output not a multiple of the stride
    assert phase_plan(4, 9, 3, 2, 0) is None  # kernel not a multiple of the stride


@pytest.mark.tvm
@pytest.mark.parametrize("cin,cout,kernel,stride,pad,out_pad,hw", [
    (5, 3, 4, 2, 1, 0, (6, 7)),  # FlowNet's deconvolutions and upsamplers
    (4, 6, 2, 2, 0, 0, (5, 4)),
    (3, 2, 4, 2, 0, 0, (4, 5)),
    (2, 3, 6, 3, 0, 0, (3, 4)),
    (3, 4, 4, 2, 2, 0, (5, 5)),
    (3, 2, 4, 2, 1, 1, (4, 4)),  # output 9x9: not a multiple of the stride, left as it is
])
def test_split_deconvolution_matches_torch(cin, cout, kernel, stride, pad, out_pad, hw):
    import torch
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from edgeflow.compile.cuda_convs import split_deconvolutions

    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose2d(cin, cout, kernel, stride, pad, output_padding=out_pad).eval()
    x = torch.randn(1, cin, *hw)
    mod = split_deconvolutions(from_exported_program(torch.export.export(layer, (x,))))
    out_hw = [(n - 1) * stride - 2 * pad + kernel + out_pad for n in hw]
    split = all(o % stride == 0 for o in out_hw)
    assert ("conv2d_transpose" in mod.script()) != split
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))
    got = (got[0] if not hasattr(got, "numpy") else got).numpy()
    with torch.no_grad():
        want = layer(x).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.tvm
def test_cast_before_concat_keeps_values():
    import tvm
    from tvm import relax
    from tvm.script import ir as I, relax as R

    from edgeflow.compile.cuda_convs import cast_before_concat

    @I.ir_module
    class Skip:  # a skip connection: one fp32 activation read by a convolution (fp16) and a concat
        @R.function
        def main(a: R.Tensor((1, 2, 4, 4), "float32"), b: R.Tensor((1, 3, 4, 4), "float32")):
            with R.dataflow():
                x = R.nn.leakyrelu(a, alpha=0.1)
                xh = R.astype(x, "float16")
                c = R.concat((x, b), axis=1)
                ch = R.astype(c, "float16")
                gv = (xh, ch)
                R.output(gv)
            return gv

    mod = cast_before_concat(Skip)
    text = mod.script()
    assert text.count("R.astype(x,") == 1 and 'R.concat((xh, ' in text  # one cast, shared
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((1, 2, 4, 4), "float32"), rng.standard_normal((1, 3, 4, 4), "float32")
    xh, ch = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b))
    x = np.where(a > 0, a, np.float32(0.1) * a)
    np.testing.assert_array_equal(ch.numpy(), np.concatenate([x, b], 1).astype("float16"))
    np.testing.assert_array_equal(xh.numpy(), x.astype("float16"))


@pytest.fixture(scope="module")
def fp16_package(tmp_path_factory):
    from edgeflow.compile import compile

    return compile("flownet2-s", target="jetson", input_size=(64, 128), precision="fp16", weights="random",
                   out=tmp_path_factory.mktemp("pkg") / "s-orin-fp16.tar").path


NARROW = 9  # flow predictors (5) and flow upsamplers (4) of flownet2-s: 2 output channels, FMA


@pytest.mark.tvm
@pytest.mark.nvcc
def test_fp16_convolutions_on_tensor_cores(fp16_package):
    from edgeflow.compile import sass
    from edgeflow.inspect import inspect_package

    report = inspect_package(fp16_package)
    kernels = report["kernels"]
    assert report["summary"]["spill_bytes"] == 0
    assert not any("conv2d_transpose" in k["name"] for k in kernels)  # every deconvolution split
    if sass.cuobjdump() is None:
        pytest.skip("cuobjdump/nvdisasm absent (make sass-tools)")
    convs = [k for k in kernels if "conv2d" in k["name"]]
    tc = [k for k in convs if k["units"] == "tensor core"]
    fma = [k for k in convs if k["units"] != "tensor core"]
    assert len(convs) == len(tc) + NARROW and len(fma) == NARROW
    # the narrow heads: a thread per pixel, no padded columns: 2 or 8 channels' work, not 64
    assert sum(k["flops"] for k in fma) < 0.1 * sum(k["flops"] for k in convs)
    assert report["summary"]["convolutions"]["tensor_core_kernels"] == len(tc)


class _Board:
    peak_fp32_tflops, peak_fp16_tflops, memory_bandwidth_gbs = 2.0, 16.0, 100.0


@pytest.mark.parametrize("kernel,kind,best_us,worst_us", [
    # 16 GFLOP of fp16 WMMA work: 16e9 / (16e12 x 0.45) s + 3 us launch .. / (16e12 x 0.20) + 10 us
    ({"name": "fused_conv2d_kernel", "units": "tensor core", "flops": 16e9, "flops_fp16": 16e9, "bytes": 1e6},
     "tensor_core", 1e3 / 0.45 + 3, 1e3 / 0.20 + 10),
    # 2 GFLOP of fp32 FMA: 2e9 / (2e12 x 0.7) s .. / (2e12 x 0.3)
    ({"name": "fused_conv2d3_kernel", "units": "fma", "flops": 2e9, "flops_fp16": 0, "bytes": 1e6},
     "fma_gemm", 1e3 / 0.7 + 3, 1e3 / 0.3 + 10),
    # 100 MB copied at 100 GB/s x 0.8 .. x 0.5
    ({"name": "fused_concatenate_kernel", "units": "other", "flops": 0, "flops_fp16": 0, "bytes": 1e8},
     "memory", 1e3 / 0.8 + 3, 1e3 / 0.5 + 10),
    ({"name": "correlation_kernel", "op": "correlation", "units": "fma", "flops": 2e9, "flops_fp16": 0,
      "bytes": 1e6}, "correlation", 1e3 / 0.4 + 3, 1e3 / 0.15 + 10),
    # SASS not read (sm_72): fp16 work in a convolution is WMMA in the TIR
    ({"name": "fused_conv2d_kernel", "units": None, "flops": 16e9, "flops_fp16": 15e9, "bytes": 1e6},
     "tensor_core", (15e9 / 16e12 + 1e9 / 2e12) / 0.45 * 1e6 + 3, (15e9 / 16e12 + 1e9 / 2e12) / 0.2 * 1e6 + 10),
])
def test_kernel_prediction(kernel, kind, best_us, worst_us):
    assert prediction.kernel_kind(kernel) == kind
    best, worst = prediction.kernel_range_us(kernel, _Board())
    assert best == pytest.approx(best_us, rel=1e-9) and worst == pytest.approx(worst_us, rel=1e-9)


def test_prediction_range_and_model():
    kernels = [{"name": "fused_conv2d_kernel", "units": "tensor core", "flops": 16e9, "flops_fp16": 16e9,
                "bytes": 1e6, "launches": 2},
               {"name": "cast_kernel", "units": "other", "flops": 0, "flops_fp16": 0, "bytes": 1e8, "launches": 1}]
    p = prediction.predict(kernels, _Board())
    lo, hi = p["range_ms"]
    assert lo == pytest.approx(2 * (1 / 0.45 + 0.003) + 1 / 0.8 + 0.003, rel=1e-3)
    assert hi == pytest.approx(2 * (1 / 0.20 + 0.010) + 1 / 0.5 + 0.010, rel=1e-3)
    assert lo <= p["ms"] <= hi and set(p["by_kind"]) == {"tensor_core", "memory"}
    assert "not measured on a board" in p["model"] and "tensor core GEMM 20%-45%" in p["model"]
    assert prediction.predict([{"name": "k", "flops": None, "bytes": None}], _Board()) is None


@pytest.mark.tvm
def test_xavier_fp16_still_compiles(tmp_path):
    """sm_72 (CUDA 11.8): WMMA exists on Volta; the same rules apply, and its SASS shows them."""
    from edgeflow.compile import compile, sass
    from edgeflow.inspect import inspect_package

    path = compile("flownet2-s", target="jetson-agx-xavier", input_size=(64, 64), precision="fp16",
                   weights="random", out=tmp_path / "x.tar").path
    report = inspect_package(path)
    assert report["summary"]["spill_bytes"] == 0
    kinds = {k["kind"] for k in report["kernels"] if "conv2d" in k["name"]}
    assert "tensor_core" in kinds  # from the TIR's fp16 work
    if sass.cuobjdump("sm_72") is not None:  # and from the SASS (CUDA 11.8's cuobjdump)
        assert report["summary"]["convolutions"]["tensor_core_flops_share"] > 0.9
    assert targets.get("jetson-agx-xavier").cuda_arch == "sm_72"


@pytest.mark.tvm
@pytest.mark.parametrize("channels", [2, 8])
def test_narrow_conv_schedule_numerics(channels):
    """The one-thread-per-pixel schedule of a flow head (fp16 data, fp32 accumulation, bias),
    run on the CPU with its thread bindings made serial, against numpy."""
    import tvm
    from tvm import te, topi

    from edgeflow.compile.cuda_convs import NarrowConv
    from edgeflow.compile.ops import verify

    x = te.placeholder((1, 10, 6, 9), "float16", name="x")
    w = te.placeholder((channels, 10, 3, 3), "float16", name="w")
    b = te.placeholder((1, channels, 1, 1), "float32", name="b")
    out = topi.add(topi.nn.conv2d_nchw(x, w, 1, 1, 1, out_dtype="float32"), b)
    func = te.create_prim_func([x, w, b, out])
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_87"})
    sch = NarrowConv().apply(func, target, False)
    assert sch is not None
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((1, 10, 6, 9)).astype("float16")
    ws = rng.standard_normal((channels, 10, 3, 3)).astype("float16")
    bs = rng.standard_normal((1, channels, 1, 1)).astype("float32")
    got, = verify.run_serialized(sch.mod["main"], [xs, ws, bs])
    pad = np.pad(xs.astype("float32"), ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.einsum("ncyxij,fcij->nfyx", np.lib.stride_tricks.sliding_window_view(pad, (3, 3), axis=(2, 3)),
                     ws.astype("float32")) + bs
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
