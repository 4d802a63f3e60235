"""Correlation at FlowNet2-c's shape: ours vs TOPI vs the torch reference on this CPU, and a
static CUDA report per Jetson board.

FlowNet2-c correlates conv3 features at 1/8 of a 448x1024 input (56x128) with 96 channels
(3/8 width): kernel 1, max displacement 20, stride2 2 -> 441 output channels. On the CPU, in
one run and on the same inputs: our hand-scheduled TIR, `topi.nn.correlation_nchw` built with
TVM's default pipeline (the only correlation TVM still ships), and edgeflow's torch reference
op. For CUDA, without a GPU: per board the plan, FLOPs, bytes, shared memory, registers and
spills from ptxas (when a toolchain for the arch is installed), and the occupancy and roofline
time of the board's own model (`Board.occupancy`, `Board.roofline_seconds`, as `edgeflow inspect`;
`cuda_report` of `edgeflow.compile.ops.correlation`).

    python bench/correlation.py [--json] [--size 448x1024] [--width 0.375] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _cpu_target():
    import tvm
    from tvm.target.codegen import llvm_get_system_cpu

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return tvm.target.Target({"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": cores}), cores


def _tvm_ms(func, args, target, number: int, repeat: int) -> tuple[float, object]:
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    lib.mod["main"](*args)  # warm up (thread pool, caches)
    res = lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)(*args)
    return statistics.median(res.results) * 1e3, args[-1].numpy()


def _torch_ms(fn, repeat: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, out


def run(height: int = 448, width: int = 1024, channel_width: float = 0.375, dtype: str = "float32",
        repeat: int = 5, boards: bool = True) -> dict:
    import numpy as np
    import torch
    import tvm
    from tvm import te, topi

    from edgeflow.compile.ops.correlation import CorrelationSpec, cuda_report, schedule_correlation, spec_primfunc
    from edgeflow.models.ops import correlation_reference

    channels = int(256 * channel_width)
    spec = CorrelationSpec(1, channels, height // 8, width // 8, dtype=dtype)
    params = dict(kernel_size=1, max_displacement=20, stride1=1, stride2=2, pad=20)
    target, cores = _cpu_target()
    torch.set_num_threads(cores)
    rng = np.random.default_rng(0)
    shape = (1, channels, height // 8, width // 8)
    f1, f2 = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    dev = tvm.cpu()

    def tensors():
        out = np.zeros(spec.out_shape, dtype)
        return [tvm.runtime.tensor(a, dev) for a in (f1, f2, out)]

    # torch first: TVM's worker threads keep spinning a while after each call and would slow it
    t1, t2 = torch.from_numpy(f1).float(), torch.from_numpy(f2).float()
    with torch.no_grad():
        torch_ms, ref = _torch_ms(lambda: correlation_reference(t1, t2, **params), repeat=max(2, repeat // 2))
    ref = ref.numpy()

    ours = schedule_correlation(spec_primfunc(spec), target)
    ours_ms, ours_out = _tvm_ms(ours, tensors(), target, number=10, repeat=repeat)

    a, b = te.placeholder(shape, dtype, "a"), te.placeholder(shape, dtype, "b")
    topi_out = topi.nn.correlation_nchw(a, b, 1, 20, 1, 2, 20, True)
    topi_func = te.create_prim_func([a, b, topi_out])
    topi_ms, topi_res = _tvm_ms(topi_func, tensors(), target, number=1, repeat=repeat)

    result = {
        "shape": {"features": list(shape), "output": list(spec.out_shape), "input_size": [height, width],
                  "dtype": dtype, **params},
        "cpu": {"target": str(target.attrs.get("mcpu", "")), "threads": cores},
        "cpu_ms": {"edgeflow": round(ours_ms, 3), "topi": round(topi_ms, 3), "torch": round(torch_ms, 3)},
        "speedup_vs_topi": round(topi_ms / ours_ms, 2),
        "speedup_vs_torch": round(torch_ms / ours_ms, 2),
        "max_abs_err": float(np.abs(ours_out.astype(np.float32) - ref).max()),
        "topi_max_abs_err": float(np.abs(topi_res.astype(np.float32) - ref).max()),
    }
    if boards:
        from edgeflow.targets import BOARDS

        result["cuda"] = {b.name: cuda_report(spec, b) for b in BOARDS.values() if b.is_cuda}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--size", default="448x1024", help="network input HxW (features at 1/8)")
    ap.add_argument("--width", type=float, default=0.375, help="channel width (0.375: 96 channels)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-boards", action="store_true", help="skip the CUDA reports")
    args = ap.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    r = run(h, w, args.width, args.dtype, args.repeat, boards=not args.no_boards)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    ms = r["cpu_ms"]
    print(f"correlation {r['shape']['features']} -> {r['shape']['output']} ({args.dtype}) on {r['cpu']['target']}"
          f" x{r['cpu']['threads']}")
    print(f"  edgeflow {ms['edgeflow']:9.2f} ms")
    print(f"  topi     {ms['topi']:9.2f} ms   ({r['speedup_vs_topi']}x slower)")
    print(f"  torch    {ms['torch']:9.2f} ms   ({r['speedup_vs_torch']}x slower)")
    print(f"  max |ours - torch| = {r['max_abs_err']:.2e}")
    for name, c in r.get("cuda", {}).items():
        p = c["plan"]
        print(f"  {name:18s} {c['arch']}: tile {p['tile_h']}x{p['tile_w']}x{p['p_block']}rows, {c['threads']} thr, "
              f"{c['shared_bytes']} B smem, {c['registers']} regs ({c['registers_source']}), "
              f"spills {c['spill_bytes']}, occupancy {c['occupancy']:.0%}, roofline {c['roofline_ms']} ms "
              f"({c['bound']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
