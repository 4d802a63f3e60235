"""int8 on aarch64 under qemu-user: the NEON `sdot` kernels of `aarch64-cpu` against the NEON
fallback (the same loops, vectorised, without the dot product), for each int8 layer of
flownet2-s quantized as `edgeflow compile --precision int8` does, on the input the layer really
sees: instructions executed in the kernel and the largest difference from the fake-quant torch op.

Instructions, not time: qemu does not model a core's timing and no ARM core is at hand. They are
counted from qemu's exec log in single-step mode, inside the kernel's own code (quantize+pad,
convolution, epilogue; not the caller). The kernels run through `aarch64_call.c` (a static
aarch64 executable that calls one TVM-compiled PrimFunc without the TVM runtime); the helpers here
serve tests/test_quantize_arm.py too.

    python bench/arm_int8.py [--json] [--size 64x64]

Needs qemu-aarch64 (Debian's qemu-user) and aarch64-linux-gnu-gcc; `make install` installs both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU = "cortex-a76"  # ARMv8.2-A + dot product, no i8mm, as the Orins' Cortex-A78AE (qemu 7.2 has no A78)
FALLBACK = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}  # aarch64-cpu without +dotprod
DTYPES = {"float32": 2, "int8": 0, "int32": 0}  # DLPack type codes
KEYS = ("x", "weight", "w_scale", "bias", "a_scale", "zero_point", "stride", "padding", "slope")


def missing_tools() -> list[str]:
    return [t for t in ("qemu-aarch64", "aarch64-linux-gnu-gcc") if shutil.which(t) is None]


def layer_of(module, x) -> dict:
    """A QuantConv `module` and its input `x` as the layer dict the helpers take (KEYS + deconv)."""
    return dict(x=x, weight=module.weight.data, w_scale=module.w_scale.data, bias=module.bias.data,
                a_scale=module.a_scale, zero_point=module.zero_point, stride=module.stride, padding=module.padding,
                slope=module.slope, deconv=module.deconv)


def reference(layer):
    """The fake-quant torch op on `layer` (numpy float32)."""
    import torch

    op = torch.ops.edgeflow.qdeconv2d if layer["deconv"] else torch.ops.edgeflow.qconv2d
    return op(*(layer[k] for k in KEYS)).numpy()


def kernel_args(layer, out_shape):
    """(unscheduled PrimFunc of `layer`, its arguments as numpy arrays): weights packed, zero-point
    correction and scales by the product's compile-time transforms (`quantize_ops`), on this CPU."""
    import numpy as np
    import tvm
    from tvm import te

    from edgeflow.compile import quantize_ops as q

    w, deconv, s, p = layer["weight"].numpy(), layer["deconv"], layer["stride"], layer["padding"]
    wq = te.placeholder(w.shape, "int8", "w")
    wpack = q.pack_deconv_weight_te(wq, (s, s), (p, p)) if deconv else q.pack_conv_weight_te(wq)
    corr = q.correction_te(wpack, out_shape[1], layer["zero_point"], deconv)
    bufs = [tvm.runtime.tensor(w)] + [tvm.runtime.empty([int(d) for d in t.shape], t.dtype) for t in (wpack, corr)]
    tvm.compile(te.create_prim_func([wq, wpack, corr]), target="llvm")(*bufs)
    packed, correction = bufs[1].numpy(), bufs[2].numpy()
    scale = layer["w_scale"].numpy().astype("float32") * np.float32(layer["a_scale"])
    x = layer["x"].numpy()
    params = {k: layer[k] for k in ("a_scale", "zero_point", "stride", "padding", "slope")}
    func = q.qconv_primfunc("qdeconv2d" if deconv else "qconv2d",
                            [list(x.shape), list(packed.shape), list(correction.shape), list(out_shape)], params)
    return func, [x, packed, correction, scale, layer["bias"].numpy(), np.zeros(out_shape, "float32")]


def build(layer, out_shape, target, out: Path) -> tuple[Path, Path, str]:
    """`layer` scheduled (`quantize_ops.schedule_qconv`) and compiled for the aarch64 LLVM `target`,
    linked with aarch64_call.c into the static executable out/call; its arguments written beside
    it. Returns (executable, argument spec, LLVM's assembly of the kernel)."""
    import tvm
    import tvm_ffi

    from edgeflow.compile.quantize_ops import schedule_qconv

    out.mkdir(parents=True, exist_ok=True)
    func, args = kernel_args(layer, out_shape)
    with target:
        func = schedule_qconv(func, target)
    ex = tvm.compile(tvm.IRModule({"ef_entry": func.with_attr("global_symbol", "ef_entry")}), target=target)
    ex.mod.write_to_file(str(out / "kernel.o"))
    subprocess.run(["aarch64-linux-gnu-gcc", "-O1", "-static", "-I", str(Path(tvm_ffi.__file__).parent / "include"),
                    str(HERE / "aarch64_call.c"), str(out / "kernel.o"), "-o", str(out / "call"), "-lm"], check=True,
                   capture_output=True)
    lines = []
    for i, a in enumerate(args):
        a.tofile(out / f"arg{i}")
        lines.append(f"{out / f'arg{i}'} {DTYPES[str(a.dtype)]} {a.dtype.itemsize * 8} {a.ndim} "
                     f"{' '.join(map(str, a.shape))}")
    (out / "spec").write_text("\n".join(lines) + "\n")
    return out / "call", out / "spec", ex.mod.inspect_source("asm")


def run(exe: Path, spec: Path, cpu: str = CPU):
    """Run the kernel under qemu-aarch64 on `cpu`: (return code, output array read back or None)."""
    import numpy as np

    proc = subprocess.run(["qemu-aarch64", "-cpu", cpu, str(exe), str(spec)], capture_output=True, timeout=600)
    if proc.returncode != 0:
        return proc.returncode, None
    last = spec.read_text().splitlines()[-1].split()
    return 0, np.fromfile(f"{last[0]}.out", "float32").reshape([int(d) for d in last[4:]])


def instructions(exe: Path, spec: Path, cpu: str = CPU) -> int:
    """Instructions qemu executes inside the kernel object's code (single-step exec log)."""
    syms = subprocess.run(["aarch64-linux-gnu-nm", str(exe)], capture_output=True, text=True, check=True).stdout
    lo = next(int(s.split()[0], 16) for s in syms.splitlines() if s.endswith(" __tvm_ffi_ef_entry"))
    hdr = subprocess.run(["aarch64-linux-gnu-objdump", "-h", str(exe.with_name("kernel.o"))], capture_output=True,
                         text=True, check=True).stdout
    hi = lo + next(int(s.split()[2], 16) for s in hdr.splitlines() if s.split()[1:2] == [".text"])
    proc = subprocess.Popen(["qemu-aarch64", "-cpu", cpu, "-singlestep", "-d", "exec,nochain", "-D", "/dev/stdout",
                             str(exe), str(spec)], stdout=subprocess.PIPE, text=True)
    count = 0
    for line in proc.stdout:  # "Trace 0: 0x... [flags/PC/...] name"
        if line.startswith("Trace"):
            count += lo <= int(line.split("/", 2)[1], 16) < hi
    if proc.wait() != 0:
        raise RuntimeError(f"{exe} failed under qemu-aarch64 (exit {proc.returncode})")
    return count


def flownet_layers(size: tuple[int, int]) -> dict:
    """{name: layer dict} of the int8 layers of flownet2-s quantized (as the tests do, on a few
    generated pairs) at `size`, each with the input it sees on a random pair."""
    import torch

    from edgeflow.compile import quantize
    from edgeflow.compile.quantize_torch import QuantConv
    from edgeflow.models import create

    model = quantize(create("flownet2-s"), None, size=size, calibration_pairs=2, validation_pairs=2,
                     sensitivity_pairs=1)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, layer_of(mod, i[0])))
             for n, m in model.named_modules() if isinstance(m, QuantConv)]
    torch.manual_seed(0)
    with torch.no_grad():
        model(torch.rand(1, 3, *size), torch.rand(1, 3, *size))
    for h in hooks:
        h.remove()
    return seen


def main(argv=None) -> int:
    import numpy as np
    import tvm

    from edgeflow import targets

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="64x64", help="HxW input of flownet2-s, multiples of 64 (default 64x64)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if missing_tools():
        print(f"Error: {', '.join(missing_tools())} not found; make install installs them", file=sys.stderr)
        return 3
    try:
        size = tuple(int(v) for v in a.size.lower().split("x"))
        assert len(size) == 2 and all(v > 0 and v % 64 == 0 for v in size)
    except (ValueError, AssertionError):
        print(f"Error: --size {a.size!r}: expected HxW, multiples of 64, e.g. 64x64", file=sys.stderr)
        return 3
    kernels = {"sdot": targets.get("aarch64-cpu").tvm_target(), "neon": tvm.target.Target(FALLBACK)}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, layer in flownet_layers(size).items():
            want = reference(layer)
            w = layer["weight"].shape
            taps = w[2] * w[3] // (layer["stride"] ** 2 if layer["deconv"] else 1)  # deconv: (k / s)^2 per output
            macs = int(np.prod(want.shape)) * w[0 if layer["deconv"] else 1] * taps
            row = {"layer": name, "macs": macs}
            for kind, target in kernels.items():
                exe, spec, _ = build(layer, want.shape, target, Path(d) / name / kind)
                _, got = run(exe, spec)
                row[kind] = {"instructions": instructions(exe, spec),
                             "max_rel_diff": float(np.abs(got - want).max() / np.abs(want).max())}
            rows.append(row)
            if not a.json:
                neon, sdot = row["neon"]["instructions"], row["sdot"]["instructions"]
                print(f"{name:24s} {macs / 1e6:7.2f} M MAC  neon {neon:>10,d}  sdot {sdot:>9,d}  x{neon / sdot:.1f}  "
                      f"rel diff {row['sdot']['max_rel_diff']:.1e}", flush=True)
    total = {k: sum(r[k]["instructions"] for r in rows) for k in kernels}
    result = {"size": list(size), "cpu": CPU, "layers": rows, "total_instructions": total,
              "macs": sum(r["macs"] for r in rows), "ratio": round(total["neon"] / total["sdot"], 2)}
    print(json.dumps(result, indent=1) if a.json else
          f"total: {result['macs'] / 1e6:.1f} M MAC; neon {total['neon']:,d} instructions, sdot {total['sdot']:,d} "
          f"(x{result['ratio']}); {result['macs'] / total['sdot']:.2f} MAC per instruction with sdot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
