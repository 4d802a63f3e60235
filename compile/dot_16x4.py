"""What the integer dot-product tensor intrinsics share: the 16x4 description and the check
whether an intrinsic is registered. `quantize_ops.register_vnni` (x86 `vpdpbusd`, u8 activations)
and `quantize_arm.register_sdot` (NEON `sdot`, s8 activations) each add their implementation.

The description: C[i] += A[k] * B[i, k] for i < 16, k < 4; A [4] of `a_dtype`, B [16, 4] int8,
C [16] int32 (tvm.s_tir.tensor_intrin.x86's, whose package takes a minute to import).
"""

from __future__ import annotations


def registered(name: str) -> bool:
    """Whether a TVM tensor intrinsic called `name` is registered already."""
    from tvm import s_tir

    try:
        s_tir.TensorIntrin.get(name)
        return True
    except Exception:  # noqa: BLE001 - not registered (TVM raises a plain TVMError)
        return False


def desc(a_dtype: str):
    """The TIR description of the 16x4 dot product with activations A of `a_dtype`."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def dot_16x4(A: T.Buffer((4,), a_dtype, offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
                 C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return dot_16x4
