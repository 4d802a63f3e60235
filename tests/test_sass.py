"""Reading what cubins execute: the SASS instruction classes of kernels we know."""

from __future__ import annotations

import pytest

from edgeflow.compile import sass

WMMA = r"""
#include <mma.h>
using namespace nvcuda;
extern "C" __global__ void tc(const half* a, const half* b, float* c) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}
extern "C" __global__ void dot4(const int* a, const int* b, int* c) {
  c[threadIdx.x] = __dp4a(a[threadIdx.x], b[threadIdx.x], c[threadIdx.x]);
}
extern "C" __global__ void axpy(float* y, const float* x) { y[threadIdx.x] = 3.f * x[threadIdx.x] + y[threadIdx.x]; }
"""


@pytest.mark.nvcc
def test_instruction_classes_of_known_kernels():
    from edgeflow.compile.cuda_toolchain import compile_cuda

    if sass.cuobjdump() is None:
        pytest.skip("cuobjdump/nvdisasm absent (make sass-tools)")
    cubin, _ = compile_cuda(WMMA, "sm_87", "12.6")
    got = sass.instruction_classes(cubin, "sm_87")
    assert set(got) == {"tc", "dot4", "axpy"}
    assert got["tc"]["tensor_core"] >= 1  # a 16x16x16 fp16 MMA is HMMA.16816 instructions
    assert got["dot4"]["dp4a"] == 1 and got["dot4"]["tensor_core"] == 0
    assert got["axpy"] == {"tensor_core": 0, "dp4a": 0, "ffma": 1, "hfma2": 0}


def test_sm72_cubins_are_read_with_the_legacy_tools():
    """Xavier's sm_72, which CUDA 13's tools refuse, is read with CUDA 11.8's: WMMA and dp4a."""
    from edgeflow.compile.cuda_toolchain import compile_cuda

    if sass.cuobjdump("sm_72") is None:
        pytest.skip("CUDA 11.8 cuobjdump/nvdisasm absent (make sass-tools)")
    cubin, _ = compile_cuda(WMMA, "sm_72", "11.8")
    got = sass.instruction_classes(cubin, "sm_72")
    assert got["tc"]["tensor_core"] >= 1 and got["dot4"]["dp4a"] == 1
    assert got["axpy"] == {"tensor_core": 0, "dp4a": 0, "ffma": 1, "hfma2": 0}


def test_parse_counts_per_function():
    text = """
        Function : k1
        /*0000*/                   HMMA.16816.F32 R4, R8, R12, R4 ;  /* 0x0 */
        /*0010*/               @P0 FFMA R1, R2, R3, R1 ;               /* 0x0 */
        /*0020*/                   HFMA2.MMA R5, -RZ, RZ, 1.875, 0 ;   /* 0x0 */
        Function : k2
        /*0000*/                   IDP.4A.U8.S8 R1, R2, R3, R1 ;       /* 0x0 */
        /*0010*/                   HFMA2 R1, R2, R3, R1 ;              /* 0x0 */
    """
    assert sass.parse(text) == {"k1": {"tensor_core": 1, "dp4a": 0, "ffma": 1, "hfma2": 0},
                                "k2": {"tensor_core": 0, "dp4a": 1, "ffma": 0, "hfma2": 1}}
