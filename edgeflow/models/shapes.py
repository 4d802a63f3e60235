"""Shape rules of FlowNet's own layers, shared by the torch models, the ONNX export and the
compiler's operators. Standard library only (no torch), so the compiler can read them cheaply."""

from __future__ import annotations

from edgeflow.errors import InputError


def correlation_output_size(height: int, width: int, *, kernel_size: int, max_displacement: int,
                            stride1: int, pad: int) -> tuple[int, int]:
    """Output (H, W) of Caffe's Correlation layer for a (height, width) input; InputError when
    the input is too small for the displacement and padding."""
    border = max_displacement + (kernel_size - 1) // 2
    out_h = -(-(height + 2 * pad - 2 * border) // stride1)
    out_w = -(-(width + 2 * pad - 2 * border) // stride1)
    if out_h <= 0 or out_w <= 0:
        raise InputError(f"correlation input {height}x{width} too small for displacement {max_displacement} "
                         f"with pad {pad}")
    return out_h, out_w
