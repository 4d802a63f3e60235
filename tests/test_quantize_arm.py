"""int8 on aarch64 (`aarch64-cpu`, ARMv8.2-A `+dotprod`): the NEON `sdot` kernels of
`quantize_ops` / `quantize_arm`. The integer math is checked on this CPU (the signed compute,
untensorized) and, where Debian's `qemu-user` and the aarch64 cross compiler are installed (`make
install` does both), by running the cross-compiled, tensorized kernels under qemu-aarch64:
exactly the integer reference, and SIGILL on a core without the dot product (so `sdot` is what
runs). The int8 package for aarch64-cpu has `sdot` in every int8 kernel of its library."""

from __future__ import annotations

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
HERE = Path(__file__).resolve().parent
DOTPROD_CPU = "cortex-a76"  # ARMv8.2-A + dot product, no i8mm, as the Orins' Cortex-A78AE (qemu 7.2 has no A78)
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
    return dict(x=torch.randn(1, c, h, w), weight=m.weight.data, w_scale=m.w_scale.data, bias=m.bias.data,
                a_scale=m.a_scale, zero_point=m.zero_point, stride=m.stride, padding=m.padding, slope=m.slope,
                deconv=deconv)


def reference(layer) -> np.ndarray:
    """The fake-quant torch op on the layer (float32; integer layers: exact, sums under 2^24)."""
    op = torch.ops.edgeflow.qdeconv2d if layer["deconv"] else torch.ops.edgeflow.qconv2d
    return op(*(layer[k] for k in ("x", "weight", "w_scale", "bias", "a_scale", "zero_point", "stride", "padding",
                                   "slope"))).numpy()


def integer_reference(layer) -> np.ndarray:
    """sum((q - zp) * w) in float64 (exact), for the integer layers."""
    from edgeflow.compile.quantize_torch import fake_quant

    q = fake_quant(layer["x"].double(), layer["a_scale"], layer["zero_point"])
    conv = F.conv_transpose2d if layer["deconv"] else F.conv2d
    return conv(q, layer["weight"].double(), None, layer["stride"], layer["padding"]).numpy()


def kernel_args(layer, out_shape):
    """(PrimFunc of the layer, its arguments as numpy arrays): weights packed, zero-point
    correction and scales computed by the product's compile-time transforms, on this CPU."""
    import tvm
    from tvm import te

    from edgeflow.compile import quantize_ops as q

    w, deconv, s, p = layer["weight"].numpy(), layer["deconv"], layer["stride"], layer["padding"]
    o = out_shape[1]
    wq = te.placeholder(w.shape, "int8", "w")
    wpack = q.pack_deconv_weight_te(wq, (s, s), (p, p)) if deconv else q.pack_conv_weight_te(wq)
    corr = q.correction_te(wpack, o, layer["zero_point"], deconv)
    ex = tvm.compile(te.create_prim_func([wq, wpack, corr]), target="llvm")
    bufs = [tvm.runtime.tensor(w)] + [tvm.runtime.empty([int(d) for d in t.shape], t.dtype) for t in (wpack, corr)]
    ex(*bufs)
    packed, correction = bufs[1].numpy(), bufs[2].numpy()
    scale = (layer["w_scale"] * np.float32(layer["a_scale"])).numpy().astype("float32")
    x = layer["x"].numpy()
    params = {k: layer[k] for k in ("a_scale", "zero_point", "stride", "padding", "slope")}
    func = q.qconv_primfunc("qdeconv2d" if deconv else "qconv2d",
                            [list(x.shape), list(packed.shape), list(correction.shape), list(out_shape)], params)
    return func, [x, packed, correction, scale, layer["bias"].numpy(), np.zeros(out_shape, "float32")]


@pytest.mark.parametrize("name", LAYERS)
def test_the_signed_compute_is_the_integer_reference(name):
    """On this CPU, untensorized: activations shifted to int8 and the shift folded into the
    weight-sum correction give exactly sum((q - zp) * w); with real scales, the fake-quant op."""
    import tvm
    from tvm import s_tir

    from edgeflow.compile.quantize_ops import QPAD, signed_variant

    for layer, tol in ((integer_layer(LAYERS[name]), 0.0), (float_layer(LAYERS[name]), 1e-5)):
        want = integer_reference(layer) if tol == 0 else reference(layer)
        func, args = kernel_args(layer, want.shape)
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


def aarch64_kernel(layer, out_shape, tmp: Path) -> tuple[Path, Path, str]:
    """The layer's kernel scheduled and compiled for aarch64-cpu, linked with tests/aarch64_call.c
    into a static aarch64 executable; its argument files. Returns (executable, spec, assembly)."""
    import tvm
    import tvm_ffi

    from edgeflow import targets
    from edgeflow.compile.quantize_ops import schedule_qconv

    target = targets.get("aarch64-cpu").tvm_target()
    func, args = kernel_args(layer, out_shape)
    with target:
        func = schedule_qconv(func, target)
    ex = tvm.compile(tvm.IRModule({"ef_entry": func.with_attr("global_symbol", "ef_entry")}), target=target)
    ex.mod.write_to_file(str(tmp / "kernel.o"))
    include = Path(tvm_ffi.__file__).parent / "include"
    subprocess.run(["aarch64-linux-gnu-gcc", "-O1", "-static", "-I", str(include), str(HERE / "aarch64_call.c"),
                    str(tmp / "kernel.o"), "-o", str(tmp / "call"), "-lm"], check=True, capture_output=True)
    codes = {"float32": 2, "int8": 0, "int32": 0}
    lines = []
    for i, a in enumerate(args):
        a.tofile(tmp / f"arg{i}")
        lines.append(f"{tmp / f'arg{i}'} {codes[str(a.dtype)]} {a.dtype.itemsize * 8} {a.ndim} "
                     f"{' '.join(map(str, a.shape))}")
    (tmp / "spec").write_text("\n".join(lines) + "\n")
    return tmp / "call", tmp / "spec", ex.mod.inspect_source("asm")


def needs_qemu():
    missing = [t for t in ("qemu-aarch64", "aarch64-linux-gnu-gcc") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: the aarch64 int8 kernels are not executed here "
                    f"(Debian's qemu-user and gcc-aarch64-linux-gnu; make install installs both)")


@pytest.mark.parametrize("name", LAYERS)
def test_sdot_kernels_compute_the_integer_reference_under_qemu(name, tmp_path):
    """The tensorized aarch64 kernel, run for real (qemu-user, a dot-product core): the integer
    layer exactly, the real-scale layer as the fake-quant op within float rounding; on a
    Cortex-A57 (no dot product) the same executable dies of SIGILL."""
    needs_qemu()
    for kind, layer in (("integer", integer_layer(LAYERS[name], seed=1)), ("float", float_layer(LAYERS[name]))):
        want = integer_reference(layer) if kind == "integer" else reference(layer)
        tmp = tmp_path / kind
        tmp.mkdir()
        exe, spec, asm = aarch64_kernel(layer, want.shape, tmp)
        assert "\tsdot\t" in asm and "\tusdot\t" not in asm  # the Orins' A78AE has no i8mm (usdot)
        run = subprocess.run(["qemu-aarch64", "-cpu", DOTPROD_CPU, str(exe), str(spec)], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        got = np.fromfile(f"{tmp / 'arg5'}.out", "float32").reshape(want.shape)
        if kind == "integer":
            assert np.abs(want).max() > 1000 and np.array_equal(got, want), name
        else:
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
    old = subprocess.run(["qemu-aarch64", "-cpu", "cortex-a57", str(exe), str(spec)], capture_output=True, timeout=120)
    assert old.returncode == -signal.SIGILL


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
