"""int8 on aarch64 (`aarch64-cpu`, ARMv8.2-A `+dotprod`): the NEON `sdot` kernels of
`quantize_ops` / `quantize_arm`. The integer math is checked on this CPU (the signed compute,
untensorized) and, where Debian's `qemu-user` and the aarch64 cross compiler are installed (`make
install` does both), by running the cross-compiled, tensorized kernels under qemu-aarch64:
exactly the integer reference, SIGILL on a core without the dot product (so `sdot` is what runs),
and several times fewer instructions executed than without it (`bench/arm_int8.py`, whose qemu
helpers these tests use). The int8 package for aarch64-cpu has `sdot` in every int8 kernel of
its library."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeflow.cli import main

pytestmark = pytest.mark.tvm
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("arm_int8", ROOT / "bench" / "arm_int8.py")
arm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arm)  # the qemu helpers: build, run, kernel_args, reference
# (deconv, in channels, out channels, kernel, stride, padding, (H, W)): widths 12 (4-column
# tiles), 7 (1-column tiles), channels that do not fill the 4 x 16 blocks
LAYERS = {"conv3x3": (False, 20, 24, 3, 1, 1, (8, 12)), "conv5x5s2": (False, 10, 40, 5, 2, 2, (9, 14)),
          "deconv": (True, 10, 20, 4, 2, 1, (4, 6)), "deconv-wide": (True, 24, 16, 4, 2, 1, (5, 8))}


def integer_layer(spec, seed: int = 0):
    """A layer whose every step is exact in float32: a_scale 1, weight scales 1, bias 0, no
    LeakyReLU, input integers that reach past both ends of the uint8 grid (zero point 37)."""
    deconv, c, o, k, s, p, (h, w) = spec
    g = torch.Generator().manual_seed(seed)
    zp = 37
    x = torch.randint(-zp - 9, 255 - zp + 10, (1, c, h, w), generator=g).float()
    weight = torch.randint(-127, 128, (c, o, k, k) if deconv else (o, c, k, k), generator=g).to(torch.int8)
    return dict(x=x, weight=weight, w_scale=torch.ones(o), bias=torch.zeros(o), a_scale=1.0, zero_point=zp,
                stride=s, padding=p, slope=1.0, deconv=deconv)


def float_layer(spec, seed: int = 0):
    """A quantized layer as `quantize` makes them (QuantConv: real scales, bias, LeakyReLU 0.1)."""
    from edgeflow.compile.quantize_torch import QuantConv

    deconv, c, o, k, s, p, (h, w) = spec
    torch.manual_seed(seed)
    m = QuantConv((torch.nn.ConvTranspose2d if deconv else torch.nn.Conv2d)(c, o, k, s, p), -1.0, 3.0, 0.1)
    return arm.layer_of(m, torch.randn(1, c, h, w))


def integer_reference(layer) -> np.ndarray:
    """sum((q - zp) * w) in float64 (exact), for the integer layers."""
    from edgeflow.compile.quantize_torch import fake_quant

    q = fake_quant(layer["x"].double(), layer["a_scale"], layer["zero_point"])
    conv = F.conv_transpose2d if layer["deconv"] else F.conv2d
    return conv(q, layer["weight"].double(), None, layer["stride"], layer["padding"]).numpy()


@pytest.mark.parametrize("name", LAYERS)
def test_the_signed_compute_is_the_integer_reference(name):
    """On this CPU, untensorized: activations shifted to int8 and the shift folded into the
    weight-sum correction give exactly sum((q - zp) * w); with real scales, the fake-quant op."""
    import tvm
    from tvm import s_tir

    from edgeflow.compile.quantize_ops import QPAD, signed_variant

    for layer, tol in ((integer_layer(LAYERS[name]), 0.0), (float_layer(LAYERS[name]), 1e-5)):
        want = integer_reference(layer) if tol == 0 else arm.reference(layer)
        func, args = arm.kernel_args(layer, want.shape)
        signed = signed_variant(func)
        for f, dtype in ((func, "uint8"), (signed, "int8")):  # what quantize+pad writes
            sch = s_tir.Schedule(f)
            assert str(sch.get(sch.get_sblock(QPAD)).writes[0].source.dtype) == dtype
        bufs = [tvm.runtime.tensor(a) for a in args]
        tvm.compile(tvm.IRModule({"main": signed.with_attr("global_symbol", "main")}), target="llvm")(*bufs)
        got = bufs[-1].numpy()
        if tol == 0:
            assert np.abs(want).max() > 1000 and np.array_equal(got, want), name
        else:
            assert np.abs(got - want).max() <= tol * np.abs(want).max(), name


def test_dotprod_is_read_from_the_target():
    import tvm

    from edgeflow import targets
    from edgeflow.compile.quantize_arm import has_dotprod
    from edgeflow.compile.quantize_ops import has_vnni

    board = targets.get("aarch64-cpu")
    assert board.llvm_json()["mattr"] == ["+neon", "+dotprod"]
    assert has_dotprod(board.tvm_target()) and not has_vnni(board.tvm_target())
    assert has_dotprod(targets.get("jetson").tvm_target().host)  # Cortex-A78 by -mcpu
    assert not has_dotprod(targets.get("jetson-agx-xavier").tvm_target().host)  # Carmel: ARMv8.2 without it
    assert not has_dotprod(targets.get("jetson-nano").tvm_target().host)  # Cortex-A57
    assert not has_dotprod(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}))
    assert not has_dotprod(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))


def needs_qemu():
    if arm.missing_tools():
        pytest.skip(f"{' and '.join(arm.missing_tools())} not installed: the aarch64 int8 kernels are not executed "
                    f"here (Debian's qemu-user and gcc-aarch64-linux-gnu; make install installs both)")


@pytest.mark.parametrize("name", LAYERS)
def test_sdot_kernels_compute_the_integer_reference_under_qemu(name, tmp_path):
    """The tensorized aarch64-cpu kernel, run for real (qemu-user, a dot-product core): the
    integer layer exactly, the real-scale layer as the fake-quant op within float rounding; on a
    Cortex-A57 (no dot product) the same executable dies of SIGILL."""
    from edgeflow import targets

    needs_qemu()
    target = targets.get("aarch64-cpu").tvm_target()
    for kind, layer in (("integer", integer_layer(LAYERS[name], seed=1)), ("float", float_layer(LAYERS[name]))):
        want = integer_reference(layer) if kind == "integer" else arm.reference(layer)
        exe, spec, asm = arm.build(layer, want.shape, target, tmp_path / kind)
        assert "\tsdot\t" in asm and "\tusdot\t" not in asm  # the Orins' A78AE has no i8mm (usdot)
        code, got = arm.run(exe, spec)
        assert code == 0
        if kind == "integer":
            assert np.abs(want).max() > 1000 and np.array_equal(got, want), name
        else:
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
    assert arm.run(exe, spec, cpu="cortex-a57")[0] == -signal.SIGILL


def test_sdot_executes_several_times_fewer_instructions_than_the_neon_fallback(tmp_path):
    """Counted by qemu inside the kernel (not timed): conv3_1 of flownet2-s (96 -> 96, 3x3) on a
    6x8 map, sdot against the same loops without the dot product, both exact."""
    import tvm

    from edgeflow import targets

    needs_qemu()
    layer = float_layer((False, 96, 96, 3, 1, 1, (6, 8)))
    want = arm.reference(layer)
    counts = {}
    for kind, target in (("sdot", targets.get("aarch64-cpu").tvm_target()), ("neon", tvm.target.Target(arm.FALLBACK))):
        exe, spec, asm = arm.build(layer, want.shape, target, tmp_path / kind)
        assert ("\tsdot\t" in asm) == (kind == "sdot")
        code, got = arm.run(exe, spec)
        assert code == 0 and np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        counts[kind] = arm.instructions(exe, spec)
    macs = 96 * 96 * 9 * 6 * 8
    assert counts["neon"] > 5 * counts["sdot"] and macs / counts["sdot"] > 6, counts


def sdot_per_function(lib: Path) -> dict[str, int]:
    """{function: number of sdot instructions} in the aarch64 shared library `lib` (objdump -d)."""
    import re

    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    counts: dict[str, int] = {}
    name = None
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            name = m.group(1)
        elif name and "\tsdot\t" in line:
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_int8_package_for_aarch64_cpu_runs_sdot(tmp_path, capsys):
    """flownet2-s int8 for aarch64-cpu: every int8 kernel of the cross-compiled library has sdot
    (objdump of the package's lib/model.so, and the manifest's counts from LLVM's assembly), and
    `edgeflow inspect` says so."""
    from edgeflow.compile import compile

    if shutil.which("aarch64-linux-gnu-objdump") is None:
        pytest.skip("aarch64-linux-gnu-objdump not installed (binutils-aarch64-linux-gnu; make install)")
    os.environ.setdefault("EDGEFLOW_CACHE", str(tmp_path / "cache"))
    fast = {"size": (64, 128), "calibration_pairs": 2, "validation_pairs": 2, "sensitivity_pairs": 1}
    out = compile("flownet2-s", target="aarch64-cpu", input_size=(64, 128), precision="int8",
                  out=tmp_path / "a.tar", quantization=fast)
    m = out.manifest
    assert m["target"]["tvm_target"]["mattr"] == ["+neon", "+dotprod"]
    assert "for this machine's CPU" in m["accuracy"]["measured_with"]  # the aarch64 code cannot run in-process
    kernels = m["quantization"]["kernels"]
    assert len(kernels) == len(m["quantization"]["layers"]) > 0
    assert all(k["instructions"].get("sdot", 0) > 0 and "vpdpbusd" not in k["instructions"] for k in kernels)
    with tarfile.open(out.path) as tar:
        tar.extract("lib/model.so", tmp_path, filter="data")
    counts = sdot_per_function(tmp_path / "lib" / "model.so")
    for k in kernels:
        assert counts.get(f"{k['name']}_compute_", 0) == k["instructions"]["sdot"], k["name"]
    assert main(["inspect", os.fspath(out.path)]) == 0
    text = capsys.readouterr().out
    assert f"{len(kernels)} of {len(kernels)} int8 kernels use integer dot products (sdot)" in text


def test_the_runtime_refuses_int8_kernels_whose_dot_product_this_cpu_lacks():
    """Where /proc/cpuinfo does not list the feature an int8 kernel's dot product needs, loading
    refuses the package in one line instead of dying of SIGILL. This x86 CPU has no asimddp."""
    import platform

    from edgeflow.errors import PackageError
    from edgeflow.runtime.format import check_runnable, cpu_flags

    flags = cpu_flags()
    if flags is None:
        pytest.skip("/proc/cpuinfo lists no CPU flags here")
    target = {"kind": "cpu", "name": "host", "machine": platform.machine()}

    def manifest(op):
        return {"target": target, "quantization": {"kernels": [{"name": "qconv2d", "instructions": {op: 8}}]}}

    for op, flag in (("sdot", "asimddp"), ("vpdpbusd", "avx512_vnni")):
        if flag in flags:
            check_runnable(manifest(op))
        else:
            with pytest.raises(PackageError, match=rf"^package's int8 kernels use {op}, which this CPU lacks "
                                                   rf"\({flag} not in /proc/cpuinfo\); compile it as fp32 or fp16$"):
                check_runnable(manifest(op))
    assert "asimddp" not in flags or platform.machine() == "aarch64"
    check_runnable({"target": target, "quantization": None})  # float packages need no dot product
