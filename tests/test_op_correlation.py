"""Correlation as TIR: CPU build and CUDA schedule (run serially on the CPU) against the torch
reference op, GPU verifier and ptxas per Jetson board, torch.export -> Relax import."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from edgeflow.errors import InputError
from edgeflow.models.ops import correlation_output_size, correlation_reference

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from edgeflow.compile.ops import CUSTOM_CONVERT_MAP, apply_hand_schedules, verify  # noqa: E402
from edgeflow.compile.ops.correlation import (  # noqa: E402
    CorrelationSpec, correlation_primfunc, cuda_report, plan_cuda, schedule_correlation, spec_primfunc)
from edgeflow.targets import BOARDS  # noqa: E402

FLOWNET = dict(kernel_size=1, max_displacement=20, stride1=1, stride2=2, pad=20)
# (channels, height, width) of the FlowNet2 family's correlations: 3/8 width (96) and full width
# (256), features at 1/8 of a 64x64 and of a 448x1024 input
FAMILY = [(96, 8, 8), (256, 8, 8), (96, 56, 128), (256, 56, 128)]
# other parameters the compute must get right (kernel, strides, padding, odd sizes)
GENERAL = [
    (8, 9, 7, dict(kernel_size=1, max_displacement=3, stride1=1, stride2=1, pad=3)),
    (6, 10, 12, dict(kernel_size=3, max_displacement=4, stride1=1, stride2=2, pad=5)),
    (8, 12, 12, dict(kernel_size=1, max_displacement=4, stride1=2, stride2=2, pad=4)),
    (4, 11, 13, dict(kernel_size=3, max_displacement=2, stride1=2, stride2=1, pad=1)),
    (5, 12, 12, dict(kernel_size=1, max_displacement=4, stride1=1, stride2=2, pad=0)),
    (12, 12, 20, dict(kernel_size=5, max_displacement=3, stride1=1, stride2=1, pad=6)),
    (8, 16, 24, dict(kernel_size=1, max_displacement=6, stride1=1, stride2=3, pad=2)),
]
CUDA_BOARDS = [b for b in BOARDS.values() if b.is_cuda]
ARCHS = sorted({b.cuda_arch for b in CUDA_BOARDS}, reverse=True)
LLVM = {"kind": "llvm"}


def cuda_target(arch: str):
    return tvm.target.Target({"kind": "cuda", "arch": arch})


def board_for(arch: str):
    return next(b for b in CUDA_BOARDS if b.cuda_arch == arch)


_REFS: dict = {}


def features(c: int, h: int, w: int, seed: int = 0):
    """A pair of random feature maps, exactly representable in fp16 (one reference serves fp32
    and fp16), with the reference output; cached per shape."""
    key = (c, h, w, seed)
    if key not in _REFS:
        rng = np.random.default_rng(seed)
        f1, f2 = (rng.standard_normal((1, c, h, w)).astype(np.float16).astype(np.float32) for _ in range(2))
        ref = correlation_reference(torch.from_numpy(f1), torch.from_numpy(f2), **FLOWNET).numpy()
        _REFS[key] = (f1, f2, ref)
    return _REFS[key]


def check(out, ref, dtype):
    out = out.astype(np.float32)
    assert out.shape == ref.shape
    err = float(np.abs(out - ref).max())
    if dtype == "float32":
        assert err <= 1e-4, err
    else:
        assert err <= 1e-2 * float(np.abs(ref).max()), (err, float(np.abs(ref).max()))


def leaky(x, slope):
    return np.where(x > 0, x, x * slope).astype(np.float32)


@pytest.mark.parametrize("h, w, params, out", [
    # Caffe: border = max_displacement + (kernel_size - 1) / 2, out = ceil((in + 2 pad - 2 border) / stride1)
    (56, 128, dict(kernel_size=1, max_displacement=20, stride1=1, pad=20), (56, 128)),  # FlowNetC: same size
    (9, 9, dict(kernel_size=3, max_displacement=4, stride1=2, pad=4), (4, 4)),  # ceil((9 + 8 - 10) / 2)
    (10, 7, dict(kernel_size=1, max_displacement=2, stride1=1, pad=0), (6, 3)),
    (12, 20, dict(kernel_size=3, max_displacement=3, stride1=3, pad=2), (3, 6)),  # ceil(8 / 3), ceil(16 / 3)
])
def test_output_size_by_hand(h, w, params, out):
    assert correlation_output_size(h, w, **params) == out
    assert CorrelationSpec(1, 8, h, w, **params).out_hw == out


def test_spec_refuses_bad_parameters():
    assert CorrelationSpec(1, 96, 56, 128).out_shape == (1, 441, 56, 128)  # D = 2 * (20 // 2) + 1 = 21
    with pytest.raises(InputError, match="odd"):
        CorrelationSpec(1, 8, 8, 8, kernel_size=2)
    with pytest.raises(InputError, match="too small"):
        CorrelationSpec(1, 8, 8, 8, max_displacement=20, pad=0)


def test_primfunc_interface():
    func = correlation_primfunc((1, 96, 8, 8), (1, 96, 8, 8), dtype="float16", leaky_slope=0.1, **FLOWNET)
    assert str(func.attrs["edgeflow.op"]) == "correlation"
    params = func.attrs["edgeflow.params"]
    assert int(params["max_displacement"]) == 20 and str(params["dtype"]) == "float16"
    assert abs(float(params["leaky_slope"]) - 0.1) < 1e-9
    assert [int(s) for s in func.params[2].shape] == [1, 441, 8, 8]
    assert CorrelationSpec.of(func) == CorrelationSpec(1, 96, 8, 8, dtype="float16", leaky_slope=0.1)
    for target in (LLVM, cuda_target("sm_87")):
        sched = schedule_correlation(func, target, None)
        assert bool(sched.attrs["tirx.is_scheduled"]) and bool(sched.attrs["tir.is_scheduled"])
        assert str(sched.attrs["edgeflow.op"]) == "correlation"


# ---------------------------------------------------------------- CPU build vs torch reference


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("c,h,w", FAMILY)
def test_cpu_family(c, h, w, dtype):
    f1, f2, ref = features(c, h, w)
    func = schedule_correlation(correlation_primfunc(f1.shape, **FLOWNET, dtype=dtype), LLVM)
    out, = verify.run_primfunc(func, [f1.astype(dtype), f2.astype(dtype)])
    check(out, ref, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cpu_fused_leaky_relu(dtype):
    f1, f2, ref = features(96, 8, 8)
    func = schedule_correlation(correlation_primfunc(f1.shape, **FLOWNET, dtype=dtype, leaky_slope=0.1), LLVM)
    out, = verify.run_primfunc(func, [f1.astype(dtype), f2.astype(dtype)])
    check(out, leaky(ref, 0.1), dtype)
    assert (out < 0).any()  # the activation kept negative values, scaled


@pytest.mark.parametrize("case", range(len(GENERAL)))
def test_cpu_general_parameters(case, rng):
    c, h, w, params = GENERAL[case]
    f1, f2 = (rng.standard_normal((2, c, h, w)).astype(np.float32) for _ in range(2))
    ref = correlation_reference(torch.from_numpy(f1), torch.from_numpy(f2), **params).numpy()
    func = correlation_primfunc(f1.shape, **params)
    for f in (func, schedule_correlation(func, LLVM)):  # unscheduled and scheduled
        out, = verify.run_primfunc(f, [f1, f2])
        check(out, ref, "float32")


def _real_features(root, width: float):
    """conv3 features of FlowNetC's tower (He-initialised, seeded) for a Sintel frame pair
    resized to 448x1024: real image statistics at FlowNet2-c's correlation shape."""
    import cv2

    from edgeflow.models import create
    from edgeflow.models.flownet import FlowNetC

    scene = root / "sintel" / "clean" / "alley_1"
    frames = sorted(scene.glob("frame_*.png"))[:2]
    if len(frames) < 2:
        pytest.skip("Sintel frames not found")
    torch.manual_seed(0)
    model = create("flownet2-c" if width < 1 else "flownet2-C", weights=None)
    net = next(m for m in model.modules() if isinstance(m, FlowNetC))
    imgs = []
    for path in frames:
        bgr = cv2.resize(cv2.imread(str(path)), (1024, 448), interpolation=cv2.INTER_AREA)
        imgs.append(torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255)
    x = model.normalize(*imgs)
    with torch.no_grad():
        f1, f2 = (net.conv3(net.conv2(net.conv1(x[:, i:i + 3])))[:, :].numpy() for i in (0, 3))
    scale = float(np.abs(f1).max())  # keep products in fp16 range
    return (f1 / scale).astype(np.float16).astype(np.float32), (f2 / scale).astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("width,channels", [(0.375, 96), (1.0, 256)])
def test_cpu_real_features(realflow, width, channels):
    f1, f2 = _real_features(realflow, width)
    assert f1.shape == (1, channels, 56, 128)
    ref = correlation_reference(torch.from_numpy(f1), torch.from_numpy(f2), **FLOWNET).numpy()
    for dtype in ("float32", "float16"):
        func = schedule_correlation(correlation_primfunc(f1.shape, **FLOWNET, dtype=dtype), LLVM)
        out, = verify.run_primfunc(func, [f1.astype(dtype), f2.astype(dtype)])
        check(out, ref, dtype)


# ------------------------------------------- CUDA schedule: numerics with threads made serial


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("c", [96, 256])
def test_cuda_serial_family_small(arch, dtype, c):
    """FlowNet2 family at 64x64 input (8x8 features), each board's plan."""
    f1, f2, ref = features(c, 8, 8)
    func = schedule_correlation(correlation_primfunc(f1.shape, **FLOWNET, dtype=dtype, leaky_slope=0.1),
                                cuda_target(arch), board_for(arch))
    out, = verify.run_serialized(func, [f1.astype(dtype), f2.astype(dtype)])
    check(out, leaky(ref, 0.1), dtype)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("c", [96, 256])
def test_cuda_serial_flownet2c_plan(arch, c):
    """The kernel each board runs at 448x1024 (its tiles, halo and indexing over the full
    56x128 map), on two channel chunks of the features to keep the serial run short."""
    full = CorrelationSpec(1, c, 56, 128)
    plan = plan_cuda(full, board_for(arch))
    f1, f2, _ = features(c, 56, 128)
    f1, f2 = f1[:, :2 * plan.chunk], f2[:, :2 * plan.chunk]
    ref = correlation_reference(torch.from_numpy(f1), torch.from_numpy(f2), **FLOWNET).numpy()
    func = schedule_correlation(correlation_primfunc(f1.shape, **FLOWNET), cuda_target(arch),
                                board_for(arch), plan=plan)
    assert dict(func.attrs["edgeflow.plan"])["tile_w"] == plan.tile_w
    out, = verify.run_serialized(func, [f1, f2])
    check(out, ref, "float32")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_serial_flownet2c_full(dtype):
    f1, f2, ref = features(96, 56, 128)
    func = schedule_correlation(correlation_primfunc(f1.shape, **FLOWNET, dtype=dtype), cuda_target("sm_87"),
                                board_for("sm_87"))
    out, = verify.run_serialized(func, [f1.astype(dtype), f2.astype(dtype)])
    check(out, ref, dtype)


@pytest.mark.parametrize("case", range(len(GENERAL)))
def test_cuda_serial_general_parameters(case, rng):
    c, h, w, params = GENERAL[case]
    f1, f2 = (rng.standard_normal((1, c, h, w)).astype(np.float32) for _ in range(2))
    ref = leaky(correlation_reference(torch.from_numpy(f1), torch.from_numpy(f2), **params).numpy(), 0.2)
    func = schedule_correlation(correlation_primfunc(f1.shape, **params, leaky_slope=0.2), cuda_target("sm_87"))
    out, = verify.run_serialized(func, [f1, f2])
    check(out, ref, "float32")


def test_serial_check_catches_schedule_bugs(rng):
    """The serial run is a real check: the same kernel with its halo fetch one column off
    (a typical index bug) fails it."""
    import tvm_ffi
    from tvm import tirx

    c, h, w, params = GENERAL[0]
    f1, f2 = (rng.standard_normal((1, c, h, w)).astype(np.float32) for _ in range(2))
    ref = correlation_reference(torch.from_numpy(f1), torch.from_numpy(f2), **params).numpy()
    func = verify.serialize_threads(
        schedule_correlation(correlation_primfunc(f1.shape, **params), cuda_target("sm_87")))
    good, = verify.run_primfunc(func, [f1, f2])
    check(good, ref, "float32")

    def off_by_one(store):
        if not store.buffer.name.startswith("f2_stage_shared") or "local" in store.buffer.name:
            return store
        *lead, x = store.indices
        return tirx.BufferStore(store.buffer, store.value, [*lead, x + 1])

    bad = func.with_body(tvm_ffi.structural_map(func.body, (tirx.BufferStore, off_by_one), order="post"))
    out, = verify.run_primfunc(bad, [f1, f2])
    assert np.abs(out - ref).max() > 1e-3


# ------------------------------------------------------------ GPU verifier, plans, ptxas


@pytest.mark.parametrize("board", CUDA_BOARDS, ids=lambda b: b.name)
@pytest.mark.parametrize("c", [96, 256])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_verifier(board, c, dtype):
    spec = CorrelationSpec(1, c, 56, 128, dtype=dtype, leaky_slope=0.1)
    plan = plan_cuda(spec, board)
    assert plan.threads <= board.max_threads_per_block
    assert plan.shared_bytes <= board.max_shared_memory_per_block
    func = schedule_correlation(spec_primfunc(spec), cuda_target(board.cuda_arch), board)
    assert verify.verify_gpu(func, cuda_target(board.cuda_arch), board)
    small = replace(board, max_shared_memory_per_block=plan.shared_bytes // 2)
    assert not verify.verify_gpu(func, cuda_target(board.cuda_arch), small)  # the verifier bites


def test_plan_follows_limits():
    spec = CorrelationSpec(1, 96, 56, 128)
    orin = BOARDS["jetson-orin-nano"]
    tight = replace(orin, max_shared_memory_per_block=12288, max_threads_per_block=256)
    a, b = plan_cuda(spec, orin), plan_cuda(spec, tight)
    assert b.shared_bytes <= 12288 and b.threads <= 256
    assert (a.tile_h, a.tile_w, a.p_block, a.chunk) != (b.tile_h, b.tile_w, b.p_block, b.chunk)
    func = schedule_correlation(spec_primfunc(spec), cuda_target("sm_87"), tight)
    assert verify.verify_gpu(func, cuda_target("sm_87"), tight)


@pytest.mark.nvcc
@pytest.mark.parametrize("arch", ["sm_87", "sm_72"])
@pytest.mark.parametrize("c", [96, 256])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ptxas_registers_and_spills(arch, c, dtype):
    board = board_for(arch)
    if verify.ptxas_tool(arch, board.cuda_version) is None:
        pytest.skip(f"no CUDA toolchain for {arch} here")
    spec = CorrelationSpec(1, c, 56, 128, dtype=dtype, leaky_slope=0.1)
    plan = plan_cuda(spec, board)
    func = schedule_correlation(spec_primfunc(spec), cuda_target(arch), board, plan=plan)
    source = verify.cuda_source(func, cuda_target(arch))
    assert "float4" in source  # vectorised cooperative loads
    assert f"__launch_bounds__({plan.threads}, {plan.blocks_per_sm})" in source  # ptxas budgets for the plan
    (kernel,) = verify.ptxas_resources(source, arch, board.cuda_version)
    assert kernel.spill_stores == 0 and kernel.spill_loads == 0 and kernel.stack_bytes == 0
    assert kernel.registers <= plan.register_budget(board), (kernel.registers, plan)
    assert kernel.shared_bytes == plan.shared_bytes
    assert board.occupancy(kernel.registers, plan.threads, kernel.shared_bytes)["blocks_per_sm"] >= plan.blocks_per_sm


# Feature maps (1/8 of the input) the FlowNet2 family compiles at: 64x64 up to 448x1024 and beyond,
# odd ones among them (384x512 -> 48x64, 320x448 -> 40x56, 704x832 -> 88x104)
SIZES = [(8, 8), (8, 16), (8, 32), (16, 16), (16, 32), (24, 32), (40, 56), (48, 64), (56, 128), (64, 128),
         (88, 104), (128, 256)]


@pytest.mark.nvcc
@pytest.mark.parametrize("arch", ["sm_87", "sm_72", "sm_53"])
def test_ptxas_no_spills_at_any_size(arch, request):
    """The kernel of every size is spill-free and within the register budget of the occupancy
    its plan aims at (3/8 width at all sizes; full width and fp16 at some)."""
    board = board_for(arch)
    if verify.ptxas_tool(arch, board.cuda_version) is None:
        pytest.skip(f"no CUDA toolchain for {arch} here")
    cases = ([(96, h, w, "float32") for h, w in SIZES] + [(256, h, w, "float32") for h, w in SIZES[::3]]
             + [(96, h, w, "float16") for h, w in SIZES[1::3]])
    bad = []
    for c, h, w, dtype in cases:
        spec = CorrelationSpec(1, c, h, w, dtype=dtype, leaky_slope=0.1)
        plan = plan_cuda(spec, board)
        kernel = _ptxas_cached(getattr(request.config, "cache", None), spec, plan, board)
        if (kernel["spill_stores"] or kernel["spill_loads"] or kernel["stack_bytes"]
                or kernel["registers"] > plan.register_budget(board)):
            bad.append((c, h, w, dtype, plan, kernel))
    assert not bad, bad


def _ptxas_cached(cache, spec, plan, board) -> dict:
    """ptxas's resources for the kernel of `spec` and `plan`, kept in pytest's cache (when there
    is one) under the hash of the CUDA source and the toolchain: TVM's codegen runs every time,
    NVRTC and ptxas once per source."""
    import hashlib

    target = cuda_target(board.cuda_arch)
    source = verify.cuda_source(schedule_correlation(spec_primfunc(spec), target, board, plan=plan), target)
    tool = verify.ptxas_tool(board.cuda_arch, board.cuda_version)
    key = "edgeflow/ptxas/" + hashlib.sha256(f"{board.cuda_arch} {tool}\n{source}".encode()).hexdigest()[:24]
    found = cache.get(key, None) if cache is not None else None
    if found is None:
        found = dict(verify.ptxas_resources(source, board.cuda_arch, board.cuda_version)[0].__dict__)
        if cache is not None:
            cache.set(key, found)
    return found


@pytest.mark.nvcc
def test_cuda_report():
    board = BOARDS["jetson-orin-nano"]
    if verify.ptxas_tool(board.cuda_arch, board.cuda_version) is None:
        pytest.skip("no CUDA toolchain for sm_87 here")
    r = cuda_report(CorrelationSpec(1, 96, 56, 128), board)
    assert r["flops"] == 2 * 441 * 56 * 128 * 96
    assert r["spill_bytes"] == 0 and r["registers_source"].startswith("ptxas")
    assert 0 < r["occupancy"] <= 1 and r["roofline_ms"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_kernel(dtype):
    dev = tvm.cuda(0)
    if not dev.exist:
        pytest.skip("no CUDA GPU")
    arch = "sm_" + dev.compute_version.replace(".", "")
    f1, f2, ref = features(96, 56, 128)
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    func = schedule_correlation(correlation_primfunc(f1.shape, **FLOWNET, dtype=dtype), target, None)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    args = [tvm.runtime.tensor(a.astype(dtype), dev) for a in (f1, f2)]
    out = tvm.runtime.tensor(np.zeros(ref.shape, dtype), dev)
    lib.mod["main"](*args, out)
    check(out.numpy(), ref, dtype)


# ------------------------------------------------------------------ torch.export -> Relax


class _Tiny(torch.nn.Module):
    def forward(self, a, b, img, flow):
        from edgeflow.models.ops import correlation, warp

        corr = torch.nn.functional.leaky_relu(correlation(a, b, 1, 4, 1, 2, 4), 0.1)
        other = torch.nn.functional.leaky_relu(a, 0.2)  # not after a correlation: stays
        return corr * 2.0, warp(img, flow) + 1.0, other


def test_torch_export_import(rng):
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    args = (torch.from_numpy(rng.standard_normal((1, 8, 8, 8)).astype(np.float32)),
            torch.from_numpy(rng.standard_normal((1, 8, 8, 8)).astype(np.float32)),
            torch.from_numpy(rng.random((1, 3, 16, 16)).astype(np.float32)),
            torch.from_numpy((rng.standard_normal((1, 2, 16, 16)) * 4).astype(np.float32)))
    ep = torch.export.export(_Tiny(), args)
    mod = from_exported_program(ep, custom_convert_map=CUSTOM_CONVERT_MAP)
    prims = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    corr = next(f for f in prims.values() if f.attrs and str(f.attrs.get("edgeflow.op", "")) == "correlation")
    assert abs(float(corr.attrs["edgeflow.params"]["leaky_slope"]) - 0.1) < 1e-9  # activation fused
    assert mod["main"].script().count("leakyrelu") == 1  # only the other one is left
    target = tvm.target.Target(LLVM)
    with target:
        mod = relax.get_pipeline("zero")(mod)  # FuseOps must leave our functions alone
    ours = [f for f in mod.functions.values() if f.attrs and "edgeflow.op" in f.attrs]
    assert sorted(str(f.attrs["edgeflow.op"]) for f in ours) == ["correlation", "warp"]
    mod = apply_hand_schedules(mod, target)
    assert all(bool(f.attrs["tirx.is_scheduled"]) for f in mod.functions.values()
               if f.attrs and "edgeflow.op" in f.attrs)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    outs = vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in args])
    with torch.no_grad():
        refs = _Tiny()(*args)
    for out, ref in zip(outs, refs):
        np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-5)


def test_apply_hand_schedules_cuda_leaves_others():
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 96, 8, 8], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            from edgeflow.compile.ops.correlation import emit_correlation

            y = emit_correlation(bb, x, x, **FLOWNET)
            z = bb.emit_output(relax.op.add(y, y))
        bb.emit_func_output(z)
    mod = bb.get()
    target = cuda_target("sm_87")
    out = apply_hand_schedules(mod, target, BOARDS["jetson-orin-nano"])
    corr = next(f for f in out.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    assert bool(corr.attrs["tirx.is_scheduled"]) and "edgeflow.plan" in corr.attrs
    assert out["main"].same_as(mod["main"]) or tvm.ir.structural_equal(out["main"], mod["main"])
