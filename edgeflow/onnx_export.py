"""A FlowNet2 model as ONNX, for peers that run ONNX (ONNX Runtime in `edgeflow bench`).

Our custom ops have no ONNX operator, so the export replaces them with standard ops (used only
here; torch and TVM keep the single-node custom ops):
- `edgeflow::warp` -> GridSample (bilinear, border padding, corner-aligned grid) and a Where
  that zeroes sample points outside the image: FlowWarp's border as `warp_reference` has it.
- `edgeflow::correlation` -> pad, then per vertical displacement one Gather of the horizontally
  shifted columns, a product with the first features and a channel mean; the displacements
  concatenated on channels in `correlation_reference`'s order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgeflow.models.ops import correlation_output_size, warp_sample_points


def warp_decomposition(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """`warp_reference` with GridSample: sample points outside [0,W)x[0,H) give 0; inside,
    border padding repeats the last column/row, as FlowWarp's clamped right/bottom neighbour."""
    _, _, h, w = image.shape
    x2, y2, inside = warp_sample_points(flow)
    grid = torch.stack((x2 * (2.0 / max(w - 1, 1)) - 1.0, y2 * (2.0 / max(h - 1, 1)) - 1.0), 3)
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return torch.where(inside.unsqueeze(1), out, torch.zeros_like(out))


def correlation_decomposition(f1: torch.Tensor, f2: torch.Tensor, kernel_size: int = 1,
                              max_displacement: int = 20, stride1: int = 1, stride2: int = 2,
                              pad: int = 20) -> torch.Tensor:
    """`correlation_reference` with a few ONNX nodes per vertical displacement instead of a few per
    displacement: the 2R+1 horizontal shifts of a row band are one Gather."""
    b, c, h, w = f1.shape
    out_h, out_w = correlation_output_size(h, w, kernel_size=kernel_size, max_displacement=max_displacement,
                                           stride1=stride1, pad=pad)
    radius = max_displacement // stride2
    d = 2 * radius + 1
    p1 = F.pad(f1, (pad, pad, pad, pad))
    p2 = F.pad(f2, (pad, pad, pad, pad))
    span_h = (out_h - 1) * stride1 + 1
    span_w = (out_w - 1) * stride1 + 1
    shifts = torch.arange(-radius, radius + 1, device=f1.device).view(d, 1) * stride2
    columns = torch.arange(out_w, device=f1.device).view(1, out_w) * stride1
    rows_out = []
    for p in range(-radius, radius + 1):
        acc = None
        for ky in range(kernel_size):
            for kx in range(kernel_size):
                y0, x0 = max_displacement + ky, max_displacement + kx
                a = p1[:, :, y0:y0 + span_h:stride1, x0:x0 + span_w:stride1]
                y2 = y0 + p * stride2
                band = p2[:, :, y2:y2 + span_h:stride1]
                shifted = band.index_select(3, (x0 + shifts + columns).reshape(-1)).view(b, c, out_h, d, out_w)
                term = (a.unsqueeze(3) * shifted).sum(1)
                acc = term if acc is None else acc + term
        rows_out.append(acc.permute(0, 2, 1, 3))  # [B, D, Ho, Wo]: the horizontal displacements
    return torch.cat(rows_out, 1) / float(kernel_size * kernel_size * c)


def export_onnx(model, input_size: tuple[int, int]) -> bytes:
    """The serialized ONNX model of `model(img1, img2) -> flow` at `input_size` (H, W): inputs
    `img1`, `img2` float32 [1,3,H,W], output `flow` [1,2,H,W]."""
    import logging
    import warnings

    h, w = input_size
    example = (torch.zeros(1, 3, h, w), torch.zeros(1, 3, h, w))
    table = {torch.ops.edgeflow.correlation.default: correlation_decomposition,
             torch.ops.edgeflow.warp.default: warp_decomposition}
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # "torchvision is not installed" and the like
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model.eval(), example).run_decompositions(table)
            program = torch.onnx.export(ep, example, dynamo=True, input_names=["img1", "img2"],
                                        output_names=["flow"], verbose=False)
    finally:
        log.setLevel(level)
    return program.model_proto.SerializeToString()
