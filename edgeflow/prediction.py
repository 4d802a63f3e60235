"""What a CUDA package should take per inference on its board: a prediction, not a measurement.

    kind = kernel_kind(kernel)                   # "tensor_core", "fma_gemm", "memory", "correlation"
    lo_us, hi_us = kernel_range_us(kernel, board)  # one launch, best and worst case
    predict(kernels, board) -> {"range_ms": [lo, hi], "ms": ..., "fps": ..., "by_kind": ..., "model": text}

Each kernel runs at an achievable fraction of its board's datasheet peaks, one range per kind of
kernel, plus a launch overhead per launch:

    time = max(FLOPs / (peak x compute fraction), bytes / (bandwidth x memory fraction)) + launch

The kind comes from where the kernel's arithmetic runs, read from its SASS at compile time
(`units`; where the SASS could not be read, sm_72, from the TIR: a GEMM-like kernel whose work is
mostly fp16 is a WMMA kernel) and from its name and operator: convolutions (GEMM-like) on tensor
cores or on the FMA pipes, our correlation, and everything else (concatenations, casts,
resampling, means, warp) bound by memory. FMA kernels do fp32 arithmetic at the fp32 peak and
packed fp16 (HFMA2) at twice that; tensor-core kernels do their fp16 MMA work at the dense fp16
tensor peak.

The fractions (FRACTIONS, LAUNCH_US) are estimates from published measurements, not from our
kernels on a board (there is none here); a GPU check that times each kernel should replace them:
- tensor_core 0.20-0.45 of the dense fp16 tensor peak: our convolutions use TVM's WMMA 16x16x16
  schedule (dlight's `MatmulTensorization`: shared-memory tiles, no ldmatrix, no cp.async) with
  the im2col index arithmetic in the tile loads. A WMMA GEMM with shared-memory tiling reaches
  about 45 % of cuBLAS on sm_120 (github.com/waynehacking8/blackwell-tensorcore-kernels:
  "the WMMA wrapper ... kept the Phase 1 kernel at 45 %"), and cuBLAS itself about 70-90 % of the
  tensor peak on large GEMMs (NVIDIA, Matrix Multiplication Background User's Guide).
- fma_gemm 0.30-0.70 of the fp32 (or packed fp16) peak: tuned SIMT GEMMs reach 85-90 % of cuBLAS
  (github.com/DefTruth/CUDA-Learn-Notes, sgemm); TVM's untuned schedules (dlight `Matmul`
  without tensor cores, our one-thread-per-pixel narrow convolutions) less.
- memory 0.50-0.80 of the datasheet DRAM bandwidth: streaming kernels on LPDDR shared with the
  CPU reach 60-85 % of the theoretical rate in STREAM-like tests; TVM's injective kernels (index
  arithmetic, partial vectorisation) sit at the low end.
- correlation 0.15-0.40 of the fp32 peak: our hand kernel (shared-memory tiles, fp32
  accumulation, 441 displacements) is limited by shared-memory loads, not FMA issue.
- launch 3-10 us per kernel launch: CUDA launch latency on Jetson (3-5 us) plus the Relax VM's
  dispatch of each call.

Standard library only (used by `edgeflow inspect`, which imports neither TVM nor torch).
"""

from __future__ import annotations

import math

KINDS = ("tensor_core", "fma_gemm", "memory", "correlation")
# (worst, best) achievable fraction of the kind's compute peak; see the module docstring. Memory-
# bound kernels' little arithmetic runs on the FMA pipes.
FRACTIONS = {"tensor_core": (0.20, 0.45), "fma_gemm": (0.30, 0.70), "memory": (0.30, 0.70),
             "correlation": (0.15, 0.40)}
MEMORY_FRACTION = (0.50, 0.80)  # (worst, best) of the datasheet DRAM bandwidth
LAUNCH_US = (10.0, 3.0)  # (worst, best) per launch
MODEL = ("achievable fractions of the datasheet peaks per kernel kind (tensor core GEMM {tc}, FMA GEMM {fma}, "
         "correlation {corr} of compute peak; DRAM {mem} of bandwidth) plus {l0:g}-{l1:g} us per launch: "
         "estimates from published GEMM and bandwidth measurements (edgeflow.prediction), not measured on a board")
GEMM_NAMES = ("conv2d", "matmul", "dense")


def kernel_kind(kernel: dict) -> str:
    """The kind of a manifest kernel entry (with "units" from `edgeflow.inspect.units`)."""
    if kernel.get("op") == "correlation":
        return "correlation"
    gemm = any(n in kernel["name"] for n in GEMM_NAMES)
    units = kernel.get("units")
    if units == "tensor core":
        return "tensor_core"
    if units is None and gemm and (kernel.get("flops_fp16") or 0) > 0.5 * (kernel.get("flops") or 0):
        return "tensor_core"  # SASS not read (sm_72): mostly fp16 work in a GEMM is WMMA in the TIR
    return "fma_gemm" if gemm else "memory"


def kernel_range_us(kernel: dict, board) -> tuple[float, float] | None:
    """(best, worst) microseconds of one launch of `kernel` on `board`; None without statistics."""
    flops, nbytes = kernel.get("flops"), kernel.get("bytes")
    if flops is None or nbytes is None:
        return None
    kind = kernel_kind(kernel)
    fp16 = kernel.get("flops_fp16") or 0
    fp32_peak = board.peak_fp32_tflops * 1e12
    if kind == "tensor_core":
        half_peak = board.peak_fp16_tflops * 1e12
    else:  # FMA pipes: packed fp16 at twice the fp32 rate (Volta, Ampere, Maxwell sm_53 alike)
        half_peak = min(2 * fp32_peak, board.peak_fp16_tflops * 1e12)
    out = []
    for i in (1, 0):  # best, then worst
        f = FRACTIONS[kind][i]
        compute = (flops - fp16) / (fp32_peak * f) + fp16 / (half_peak * f)
        memory = nbytes / (board.memory_bandwidth_gbs * 1e9 * MEMORY_FRACTION[i])
        out.append(max(compute, memory) * 1e6 + LAUNCH_US[i])
    return out[0], out[1]


def predict(kernels: list[dict], board) -> dict | None:
    """The predicted time per inference of `kernels` (manifest entries with "units" and
    "launches") on `board`: {"range_ms": [best, worst], "ms" (their geometric mean), "fps_range",
    "by_kind": {kind: [best, worst] ms}, "model": the stated model}; None without statistics."""
    ranges = [kernel_range_us(k, board) for k in kernels]
    if not kernels or any(r is None for r in ranges):
        return None
    by_kind = {kind: [0.0, 0.0] for kind in KINDS}
    for k, (lo, hi) in zip(kernels, ranges):
        n = k.get("launches", 1)
        by_kind[kernel_kind(k)][0] += lo * n / 1e3
        by_kind[kernel_kind(k)][1] += hi * n / 1e3
    lo, hi = sum(v[0] for v in by_kind.values()), sum(v[1] for v in by_kind.values())
    return {"range_ms": [round(lo, 3), round(hi, 3)], "ms": round(math.sqrt(lo * hi), 3),
            "fps_range": [round(1e3 / hi, 1), round(1e3 / lo, 1)],
            "by_kind": {kind: [round(v[0], 3), round(v[1], 3)] for kind, v in by_kind.items() if v[1]},
            "model": model_text()}


def model_text() -> str:
    def pct(r):
        return f"{r[0]:.0%}-{r[1]:.0%}"

    return MODEL.format(tc=pct(FRACTIONS["tensor_core"]), fma=pct(FRACTIONS["fma_gemm"]),
                        corr=pct(FRACTIONS["correlation"]), mem=pct(MEMORY_FRACTION),
                        l0=LAUNCH_US[1], l1=LAUNCH_US[0])
