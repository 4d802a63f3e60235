"""Our hand-scheduled CUDA kernels on a real GPU, against torch, where that GPU has no TVM.

The GPU machine that is lent now and then (an x86-64 host with one H200) has torch, CuPy and
nvcc but no TVM and no package registry. So the check comes in two halves:

    python bench/gpu_check.py prepare out/gpu-kit      # here, with TVM: our kernels' CUDA C
    python bench/gpu_check.py run out/gpu-kit --json   # there: build, run, compare, time

`prepare` writes, per case, TVM's CUDA C of the hand-scheduled correlation and warp kernels
exactly as a Jetson package holds them (planned for the Orin Nano, sm_87) and `kit.json` with
each kernel's name, launch grid and block, and its arguments in order. `run` compiles each
source for the local GPU (nvcc -cubin, else CuPy's NVRTC), launches it through CuPy on inputs
made by torch, checks the output against edgeflow's torch reference ops (fp32 to 1e-4, fp16 to
1 % of the output's range, as tests/test_op_correlation.py does), and times it and the torch
reference with CUDA events (median of 50 launches after 5). The JSON holds, per case: the max
error, pass/fail, ms of ours and of torch's, and GFLOP/s or GB/s, with the GPU's name: the
figures that recalibrate the achieved fractions of `edgeflow.compile.kernel_stats`.
`bash bench/gpu_check.sh` runs `run` and then the `gpu`-marked tests where TVM is importable.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

# (name, op, input shape NCHW, dtype): the correlations of flownet2-s/ss at 384x512 and
# 448x1024 (3/8 width: 96 channels at 1/8 of the input) and the image warp of flownet2-ss
CASES = [
    ("correlation-384x512-fp32", "correlation", (1, 96, 48, 64), "float32"),
    ("correlation-384x512-fp16", "correlation", (1, 96, 48, 64), "float16"),
    ("correlation-448x1024-fp16", "correlation", (1, 96, 56, 128), "float16"),
    ("warp-384x512-fp32", "warp", (1, 3, 384, 512), "float32"),
    ("warp-448x1024-fp16", "warp", (1, 3, 448, 1024), "float16"),
]
FLOWNET = dict(kernel_size=1, max_displacement=20, stride1=1, stride2=2, pad=20)
BOARD = "jetson-orin-nano"


# --------------------------------------------------------------------------------------------
# prepare (TVM)


def _launch(func, target) -> tuple[list[int], list[int]]:
    """(grid, block) of a one-kernel scheduled PrimFunc, from its thread extents."""
    import tvm_ffi
    from tvm import tirx

    from edgeflow.compile.ops.verify import lower_device

    extents = {}

    def visit(node):
        if node.attr_key == "thread_extent":
            extents.setdefault(node.node.thread_tag, set()).add(int(node.value))

    tvm_ffi.structural_walk(lower_device(func, target).body, (tirx.AttrStmt, visit))
    if any(len(v) != 1 for v in extents.values()):
        raise SystemExit(f"more than one kernel in a function: thread extents {extents}")
    dims = {k: next(iter(v)) for k, v in extents.items()}
    return ([dims.get(f"blockIdx.{a}", 1) for a in "xyz"], [dims.get(f"threadIdx.{a}", 1) for a in "xyz"])


def prepare(kit: Path) -> None:
    import tvm

    from edgeflow import targets
    from edgeflow.compile.ops.correlation import correlation_primfunc, schedule_correlation
    from edgeflow.compile.ops.verify import cuda_source
    from edgeflow.compile.ops.warp import schedule_warp, warp_primfunc

    board = targets.get(BOARD)
    target = tvm.target.Target({"kind": "cuda", "arch": board.cuda_arch}, host={"kind": "llvm"})
    kit.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, op, shape, dtype in CASES:
        if op == "correlation":
            func = schedule_correlation(correlation_primfunc(shape, **FLOWNET, dtype=dtype), target, board)
        else:
            func = schedule_warp(warp_primfunc(shape, dtype=dtype), target, board)
        source = cuda_source(func, target)
        kernels = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(([^)]*)\)\s*\{',
                             source)
        if len(kernels) != 1:
            raise SystemExit(f"{name}: expected one kernel in TVM's CUDA C, found {[k[0] for k in kernels]}")
        kernel, params = kernels[0]
        args = [re.search(r"(\w+)_ptr$", p.strip()).group(1) for p in params.split(",")]
        inputs = ["f1", "f2"] if op == "correlation" else ["image", "flow"]
        outputs = [a for a in args if a not in inputs]
        if sorted(args) != sorted(inputs + outputs) or len(outputs) != 1:
            raise SystemExit(f"{name}: kernel arguments {args}, expected {inputs} and one output")
        grid, block = _launch(func, target)
        (kit / f"{name}.cu").write_text(source)
        cases.append({"name": name, "op": op, "shape": list(shape), "dtype": dtype, "params": FLOWNET,
                      "source": f"{name}.cu", "kernel": kernel, "args": args, "output": outputs[0], "grid": grid,
                      "block": block})
        print(f"{name}: {kernel} grid {grid} block {block} args {args}", file=sys.stderr)
    (kit / "kit.json").write_text(json.dumps({"board": BOARD, "arch": board.cuda_arch, "tvm": tvm.__version__,
                                              "cases": cases}, indent=1))


# --------------------------------------------------------------------------------------------
# run (torch + CuPy, no TVM)


def _module(path: Path, arch: str, work: Path):
    """A CuPy module of the CUDA C at `path` for `arch` (sm_XY): nvcc's cubin, else NVRTC."""
    import shutil
    import subprocess

    import cupy

    if shutil.which("nvcc"):
        cubin = work / (path.stem + f".{arch}.cubin")
        subprocess.run(["nvcc", "-cubin", f"-arch={arch}", "-O3", "-o", str(cubin), str(path)], check=True)
        return cupy.RawModule(path=str(cubin))
    return cupy.RawModule(code=path.read_text(), options=("--std=c++17", f"--gpu-architecture={arch}"))


def _inputs(case, torch, dev):
    """Inputs on the GPU (exactly representable in fp16, so one fp32 reference serves both)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    n, c, h, w = case["shape"]
    if case["op"] == "correlation":
        return [torch.randn(n, c, h, w, generator=g).half().float().to(dev) for _ in range(2)]
    image = torch.rand(n, c, h, w, generator=g).half().float().to(dev)
    flow = (torch.randn(n, 2, h, w, generator=g) * 6).half().float().to(dev)  # some samples leave the image
    return [image, flow]


def _time(fn, cupy, reps: int = 50, warmup: int = 5) -> float:
    """Median ms of `fn()` on the GPU, each launch between two CUDA events."""
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def run(kit: Path) -> dict:
    import cupy
    import torch

    from edgeflow.models.ops import correlation_reference, warp_reference

    meta = json.loads((kit / "kit.json").read_text())
    dev = torch.device("cuda")
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    work = Path(kit) / "build"
    work.mkdir(exist_ok=True)
    results = []
    for case in meta["cases"]:
        inputs = _inputs(case, torch, dev)
        if case["op"] == "correlation":
            ref_fn = lambda: correlation_reference(*inputs, **case["params"])  # noqa: E731
        else:
            ref_fn = lambda: warp_reference(*inputs)  # noqa: E731
        ref = ref_fn()
        dtype = torch.float16 if case["dtype"] == "float16" else torch.float32
        args = {"f1": inputs[0], "f2": inputs[1]} if case["op"] == "correlation" else \
            {"image": inputs[0], "flow": inputs[1]}
        args = {k: v.to(dtype).contiguous() for k, v in args.items()}
        args[case["output"]] = out = torch.zeros(ref.shape, dtype=dtype, device=dev)
        kernel = _module(kit / case["source"], arch, work).get_function(case["kernel"])
        ptrs = tuple(cupy.asarray(args[a]) for a in case["args"])

        def ours():
            kernel(tuple(case["grid"]), tuple(case["block"]), ptrs)

        ours()
        torch.cuda.synchronize()
        err = float((out.float() - ref).abs().max())
        scale = float(ref.abs().max())
        ok = err <= (1e-4 if case["dtype"] == "float32" else 1e-2 * scale)
        ms, ref_ms = _time(ours, cupy), _time(ref_fn, cupy)
        row = {"case": case["name"], "ok": ok, "max_error": err, "output_max": scale, "ms": round(ms, 4),
               "torch_reference_ms": round(ref_ms, 4), "speedup_vs_torch": round(ref_ms / ms, 2)}
        if case["op"] == "correlation":
            n, c, _, _ = case["shape"]
            d = 2 * (case["params"]["max_displacement"] // case["params"]["stride2"]) + 1
            flops = 2 * n * d * d * ref.shape[2] * ref.shape[3] * c
            row["gflop_per_s"] = round(flops / ms / 1e6, 1)
        else:
            moved = sum(a.numel() * a.element_size() for a in args.values())
            row["gb_per_s"] = round(moved / ms / 1e6, 1)
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    return {"gpu": torch.cuda.get_device_name(0), "arch": arch, "kit_arch": meta["arch"], "torch": torch.__version__,
            "cupy": cupy.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results,
            "passed": all(r["ok"] for r in results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["prepare", "run"])
    parser.add_argument("kit", type=Path, help="the kit directory")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (run)")
    args = parser.parse_args()
    if args.mode == "prepare":
        prepare(args.kit)
        return 0
    report = run(args.kit)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
