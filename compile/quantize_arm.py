"""int8 on aarch64: the NEON dot product (`sdot`, ARMv8.2-A `+dotprod`) as a 16x4 tensor intrinsic.

`sdot` is signed x signed (its unsigned twin `udot` unsigned x unsigned; the mixed `usdot` needs
i8mm, which the Jetson Orins' Cortex-A78AE lacks), so the int8 convolutions of `quantize_ops`
run on aarch64 in their signed form: quantize+pad stores each uint8 activation `q` as the int8
`q - 128`, and the epilogue subtracts `(zp - 128) * sum(w)` instead of `zp * sum(w)` (both sums
come from the `corr` input, computed from the weights at compile time). Then

    sum((q - 128) * w) - (zp - 128) * sum(w) = sum((q - zp) * w)

exactly, in int32, as on x86 (VNNI, u8 x s8). One intrinsic call is the same 16-output x
4-input-channel block as the VNNI one: four `sdot v.4s, v.16b, v.16b`, each 4 output channels
x 4 input channels, the 4 activation bytes broadcast to the 16 byte lanes.

TVM's own `dot_4x4_i8i8s32_sdot` (tvm/s_tir/tensor_intrin/arm_cpu.py) has the same body for 4
outputs and builds with the LLVM of TVM 0.27 (unlike its VNNI one), but importing that package
takes one to two minutes per process, so the 16-wide block is registered here, beside the VNNI one.
"""

from __future__ import annotations

SDOT_INTRIN = "edgeflow_dot_16x4_sdot"
# Output columns per register tile: 4 int32x4 accumulators per column of 16 channels out of 32
# NEON registers, plus 4 for the weights and the broadcast activations of the unrolled taps. 4
# columns keep the inner loop free of spills; 6 spilled (LLVM's aarch64 assembly).
SDOT_COLUMNS = 4


def has_dotprod(target) -> bool:
    """Whether the LLVM `target` is aarch64 with the dot-product extension (by -mcpu, e.g.
    cortex-a78, or -mattr=+dotprod, as LLVM reads them)."""
    from tvm.target import codegen

    if str(target.kind.name) != "llvm" or not str(target.attrs.get("mtriple", "")).startswith("aarch64"):
        return False
    return bool(codegen.target_has_features("dotprod", target))


def register_sdot() -> str:
    """Register (once) the 16x4 s8 x s8 -> s32 dot product as four NEON `sdot`. Returns its name."""
    from tvm import s_tir
    from tvm.script import tirx as T

    from edgeflow.compile import dot_16x4

    if dot_16x4.registered(SDOT_INTRIN):
        return SDOT_INTRIN

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4), dtype="int8x16")
            for j in T.unroll(4):
                C[T.ramp(j * 4, 1, 4)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                    C.vload([j * 4], dtype="int32x4"), B.vload([j * 4, 0], dtype="int8x16"), a, dtype="int32x4")

    s_tir.TensorIntrin.register(SDOT_INTRIN, dot_16x4.desc("int8"), impl)
    return SDOT_INTRIN
