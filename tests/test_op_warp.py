"""Backward warping as TIR: CPU build and CUDA schedule (run serially on the CPU) against the
torch reference op and a port of Caffe's FlowWarp, at every kind of border point; GPU verifier
and ptxas per Jetson board."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from edgeflow.models.ops import warp_reference
from test_models import border_flow, caffe_flow_warp

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from edgeflow.compile.ops import CUSTOM_CONVERT_MAP, apply_hand_schedules, verify  # noqa: E402
from edgeflow.compile.ops.warp import schedule_warp, warp_primfunc  # noqa: E402
from edgeflow.targets import BOARDS  # noqa: E402

CUDA_BOARDS = [b for b in BOARDS.values() if b.is_cuda]
LLVM = {"kind": "llvm"}
# (batch, channels, height, width): the stacked FlowNet2 stages warp 3-channel images at full
# resolution (64x64 in tests, 448x1024 in the product)
SHAPES = [(1, 3, 64, 64), (2, 3, 48, 80), (1, 3, 448, 1024)]


def cuda_target(arch: str):
    return tvm.target.Target({"kind": "cuda", "arch": arch})


def inputs(shape, rng, scale=6.0):
    """Image in [0, 1] and a flow that sends whole rows and columns just outside the image, into
    its last pixel (right/bottom neighbour clamped) and far outside."""
    b, _, h, w = shape
    img = rng.random(shape).astype(np.float16).astype(np.float32)
    flow = (rng.standard_normal((b, 2, h, w)) * scale).astype(np.float16).astype(np.float32)
    flow[:, 0, :, :2] = -3.5  # left: outside
    flow[:, 0, :, 2] = -2.5  # x2 = -0.5: outside (0, not half of column 0)
    flow[:, 0, :, -1] = 0.5  # x2 = W - 0.5: inside, right neighbour clamped to column W-1
    flow[:, 1, -2:, :] = 2.25  # bottom: outside
    flow[:, 1, -3, :] = 2.5  # y2 = H - 0.5: inside, bottom neighbour clamped to row H-1
    flow[:, :, :1, :] = 1e3  # far outside
    flow[:, :, 5, 5] = 0.0  # integer positions
    return img, flow


def reference(img, flow):
    return warp_reference(torch.from_numpy(img), torch.from_numpy(flow)).numpy()


def check(out, ref, dtype):
    err = float(np.abs(out.astype(np.float32) - ref).max())
    if dtype == "float32":
        assert err <= 1e-4, err
    else:
        assert err <= 1e-2 * float(np.abs(ref).max()), err


def test_primfunc_interface():
    func = warp_primfunc((1, 3, 64, 64), dtype="float16")
    assert str(func.attrs["edgeflow.op"]) == "warp"
    assert [int(s) for s in func.params[1].shape] == [1, 2, 64, 64]
    for target in (LLVM, cuda_target("sm_87")):
        sched = schedule_warp(func, target, None)
        assert bool(sched.attrs["tirx.is_scheduled"])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu(shape, dtype, rng):
    img, flow = inputs(shape, rng)
    ref = reference(img, flow)
    func = warp_primfunc(shape, dtype=dtype)
    out, = verify.run_primfunc(schedule_warp(func, LLVM), [img.astype(dtype), flow.astype(dtype)])
    check(out, ref, dtype)
    if shape[2] <= 64:
        out, = verify.run_primfunc(func, [img.astype(dtype), flow.astype(dtype)])  # unscheduled
        check(out, ref, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", [(1, 3, 5, 6), (2, 2, 4, 11)], ids=str)
def test_border_cases(shape, dtype, rng):
    """Points just outside each border, exactly on the first/last row and column, within the
    last pixel, corners, inside, far and NaN: the CPU and the CUDA schedule (serial), against the
    Caffe port and the torch reference."""
    b, _, h, w = shape
    img = rng.random(shape).astype(dtype)
    flow = border_flow(b, h, w).astype(dtype)
    caffe = caffe_flow_warp(img.astype(np.float32), flow.astype(np.float32))
    ref = reference(img.astype(np.float32), flow.astype(np.float32))
    np.testing.assert_array_equal(ref, caffe)
    func = warp_primfunc(shape, dtype=dtype)
    cpu, = verify.run_primfunc(schedule_warp(func, LLVM), [img, flow])
    board = next(bd for bd in CUDA_BOARDS if bd.cuda_arch == "sm_87")
    cuda, = verify.run_serialized(schedule_warp(func, cuda_target("sm_87"), board), [img, flow])
    outside = caffe == 0
    for out in (cpu, cuda):
        assert (out[outside] == 0).all()
        if dtype == "float32":
            np.testing.assert_allclose(out, caffe, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_allclose(out.astype(np.float32), caffe, rtol=2e-3, atol=1e-3)


def test_border_values():
    """FlowWarp's border on a 4x4 image of ones: 0 outside, 1 within the last column and row."""
    img = np.ones((1, 1, 4, 4), np.float32)
    flow = np.zeros((1, 2, 4, 4), np.float32)
    flow[0, 0, 1, 3] = 0.5  # x2 = 3.5: inside, right neighbour clamped: 1
    flow[0, 0, 2, 0] = -0.25  # x2 = -0.25: outside: 0
    flow[0, 1, 3, 1] = 0.75  # y2 = 3.75: inside, bottom neighbour clamped: 1
    flow[0, 1, 3, 2] = 1.0  # y2 = 4: outside
    flow[0, 1, 0, 2] = -1e-3  # y2 < 0: outside
    out, = verify.run_primfunc(schedule_warp(warp_primfunc(img.shape), LLVM), [img, flow])
    assert out[0, 0, 1, 3] == 1.0 and out[0, 0, 3, 1] == 1.0 and out[0, 0, 0, 0] == 1.0
    assert out[0, 0, 2, 0] == 0.0 and out[0, 0, 3, 2] == 0.0 and out[0, 0, 0, 2] == 0.0
    np.testing.assert_array_equal(out, reference(img, flow))


def test_cpu_real_images(realflow):
    """Middlebury RubberWhale: frame 11 warped by the true flow against the reference op."""
    import cv2

    from edgeflow.flow_io import read_flow

    seq = realflow / "middlebury-color" / "RubberWhale"
    if not seq.is_dir():
        pytest.skip("RubberWhale not found")
    img = cv2.imread(str(seq / "frame11.png"))[:, :, ::-1].astype(np.float32) / 255
    flow = read_flow(seq / "flow10.flo").astype(np.float32)
    flow[~np.isfinite(flow) | (np.abs(flow) > 1e8)] = 0  # unknown vectors
    img = np.ascontiguousarray(img.transpose(2, 0, 1)[None])
    flow = np.ascontiguousarray(flow.transpose(2, 0, 1)[None])
    ref = reference(img, flow)
    out, = verify.run_primfunc(schedule_warp(warp_primfunc(img.shape), LLVM), [img, flow])
    check(out, ref, "float32")


@pytest.mark.parametrize("arch", sorted({b.cuda_arch for b in CUDA_BOARDS}))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_cuda_serial(shape, dtype, arch, rng):
    img, flow = inputs(shape, rng)
    board = next(b for b in CUDA_BOARDS if b.cuda_arch == arch)
    func = schedule_warp(warp_primfunc(shape, dtype=dtype), cuda_target(arch), board)
    out, = verify.run_serialized(func, [img.astype(dtype), flow.astype(dtype)])
    check(out, reference(img, flow), dtype)


@pytest.mark.parametrize("board", CUDA_BOARDS, ids=lambda b: b.name)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_verifier(board, dtype):
    func = schedule_warp(warp_primfunc((1, 3, 448, 1024), dtype=dtype), cuda_target(board.cuda_arch), board)
    assert verify.verify_gpu(func, cuda_target(board.cuda_arch), board)
    assert not verify.verify_gpu(func, cuda_target(board.cuda_arch), replace(board, max_threads_per_block=32))


@pytest.mark.nvcc
@pytest.mark.parametrize("arch", ["sm_87", "sm_72", "sm_53"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", [(1, 3, 64, 256), (1, 3, 448, 1024)], ids=str)
def test_ptxas(arch, dtype, shape):
    board = next(b for b in CUDA_BOARDS if b.cuda_arch == arch)
    if verify.ptxas_tool(arch, board.cuda_version) is None:
        pytest.skip(f"no CUDA toolchain for {arch} here")
    func = schedule_warp(warp_primfunc(shape, dtype=dtype), cuda_target(arch), board)
    (kernel,) = verify.ptxas_resources(verify.cuda_source(func, cuda_target(arch)), arch, board.cuda_version)
    assert kernel.spill_stores == 0 and kernel.spill_loads == 0 and kernel.stack_bytes == 0
    assert kernel.registers <= 64  # full occupancy needs <= 32 per thread at 2048 threads/SM; 64 = half
    assert board.occupancy(kernel.registers, 256)["occupancy"] >= 0.5


@pytest.mark.gpu
def test_gpu_kernel(rng):
    dev = tvm.cuda(0)
    if not dev.exist:
        pytest.skip("no CUDA GPU")
    arch = "sm_" + dev.compute_version.replace(".", "")
    shape = (1, 3, 448, 1024)
    img, flow = inputs(shape, rng)
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    func = schedule_warp(warp_primfunc(shape), target, None)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    out = tvm.runtime.tensor(np.zeros(shape, np.float32), dev)
    lib.mod["main"](tvm.runtime.tensor(img, dev), tvm.runtime.tensor(flow, dev), out)
    check(out.numpy(), reference(img, flow), "float32")


class _Warp(torch.nn.Module):
    def forward(self, img, flow):
        from edgeflow.models.ops import warp

        return warp(img, flow) * 2.0


def test_torch_export_import(rng):
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    img, flow = inputs((1, 3, 32, 32), rng)
    args = (torch.from_numpy(img), torch.from_numpy(flow))
    mod = from_exported_program(torch.export.export(_Warp(), args), custom_convert_map=CUSTOM_CONVERT_MAP)
    target = tvm.target.Target(LLVM)
    with target:
        mod = relax.get_pipeline("zero")(mod)
    mod = apply_hand_schedules(mod, target)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in (img, flow)])
    out = out[0] if not hasattr(out, "numpy") else out
    np.testing.assert_allclose(out.numpy(), reference(img, flow) * 2.0, atol=1e-5)
