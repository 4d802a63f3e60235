"""fp16 packages run our operators in fp16: `to_fp16` after ToMixedPrecision, numerics on the CPU,
and a Jetson fp16 package of a FlowNet2 with correlation and warp."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from edgeflow.models.ops import correlation_reference, warp_reference

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from tvm import relax  # noqa: E402

from edgeflow.compile.ops import apply_hand_schedules, to_fp16  # noqa: E402
from edgeflow.compile.ops.correlation import emit_correlation  # noqa: E402
from edgeflow.compile.ops.warp import emit_warp  # noqa: E402

CORR = dict(kernel_size=1, max_displacement=4, stride1=1, stride2=2, pad=4)


def _module():
    """main(a, b, img, flow): correlation of a with (a cast to fp16 and back) + b, its result also
    cast to fp16; warp of img by flow. After ToMixedPrecision, as a FlowNet's fp16 graph."""
    t = relax.TensorType
    a, b = relax.Var("a", t([1, 8, 8, 8], "float32")), relax.Var("b", t([1, 8, 8, 8], "float32"))
    img, flow = relax.Var("img", t([1, 3, 16, 16], "float32")), relax.Var("flow", t([1, 2, 16, 16], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [a, b, img, flow]):
        with bb.dataflow():
            half = bb.emit(relax.op.astype(relax.op.add(a, b), "float16"))
            back = bb.emit(relax.op.astype(half, "float32"))  # an fp16 value read in fp32
            corr = emit_correlation(bb, back, b, **CORR)
            corr16 = bb.emit(relax.op.astype(corr, "float16"))  # a consumer that wants fp16
            warped = emit_warp(bb, img, flow)
            out = bb.emit_output(relax.Tuple([relax.op.astype(corr16, "float32"), warped]))
        bb.emit_func_output(out)
    return bb.get()


def _calls(mod):
    """(PrimFunc dtype, argument dtypes) of every call_tir of our operators in main."""
    out = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            v = binding.value
            if isinstance(v, relax.Call) and v.op.name == "relax.call_tir":
                func = mod[v.args[0]]
                out.append((str(func.attrs["edgeflow.op"]), str(func.attrs["edgeflow.params"]["dtype"]),
                            [str(a.ty.dtype) for a in v.args[1].fields]))
    return sorted(out)


def test_to_fp16_rewrites_our_calls():
    mod = to_fp16(_module())
    assert _calls(mod) == [("correlation", "float16", ["float16", "float16"]),
                           ("warp", "float16", ["float16", "float16"])]
    ours = [f for f in mod.functions.values() if f.attrs is not None and "edgeflow.op" in f.attrs]
    assert len(ours) == 2  # the fp32 variants are gone
    text = mod["main"].script()
    # the fp16 value feeds the correlation uncast and its fp16 consumer reads the fp16 result: the
    # casts left are a+b, b, img and flow to fp16, the warp's result and main's output to fp32
    assert text.count("R.astype") == 6, text


def test_to_fp16_numerics(rng):
    a, b = (rng.standard_normal((1, 8, 8, 8)).astype(np.float32) for _ in range(2))
    img = rng.random((1, 3, 16, 16)).astype(np.float32)
    flow = (rng.standard_normal((1, 2, 16, 16)) * 3).astype(np.float32)
    target = tvm.target.Target({"kind": "llvm"})
    mod = to_fp16(_module())
    with target:
        mod = relax.get_pipeline("zero")(mod)
    vm = relax.VirtualMachine(tvm.compile(apply_hand_schedules(mod, target), target=target), tvm.cpu())
    corr, warped = (o.numpy() for o in vm["main"](*[tvm.runtime.tensor(x) for x in (a, b, img, flow)]))
    t = torch.from_numpy
    ref_corr = correlation_reference(t((a + b).astype(np.float16).astype(np.float32)), t(b), **CORR).numpy()
    ref_warp = warp_reference(t(img), t(flow)).numpy()
    assert np.abs(corr - ref_corr).max() <= 1e-2 * np.abs(ref_corr).max()
    assert np.abs(warped - ref_warp).max() <= 1e-2 * np.abs(ref_warp).max()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["jetson", "host"])
def test_flownet2_css_fp16_package(target, tmp_path):
    """fp16 FlowNet2-CSS within the fp16 tolerance of the torch model; on the Jetson its
    correlation and warp kernels read half inputs (2 bytes per element) and do not spill."""
    from conftest import TOLERANCE, engine_epe_vs_torch

    from edgeflow.compile import compile
    from edgeflow.models import create
    from edgeflow.runtime import load

    torch.manual_seed(5)
    model = create("flownet2-css", weights=None)
    path = compile(model, target=target, input_size=(64, 256), precision="fp16", out=tmp_path / "css16.tar").path
    with tarfile.open(path) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    if target == "host":  # the package run by the Engine on pairs the compiler never saw
        assert engine_epe_vs_torch(load(path), model, (64, 256)) < TOLERANCE["fp16"]
        return
    ours = {k["op"]: k for k in manifest["kernels"] if k["op"]}
    assert set(ours) == {"correlation", "warp"}
    # correlation of two 96-channel feature maps at 1/8 (8x32); warp of an image by a flow at 64x256
    assert ours["correlation"]["bytes_read"] == 2 * 96 * 8 * 32 * 2
    assert ours["warp"]["bytes_read"] == (3 + 2) * 64 * 256 * 2
    for k in ours.values():
        assert "fp16" in k["name"] and k["spill_stores"] == k["spill_loads"] == 0, k
