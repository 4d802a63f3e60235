"""Reference ops of FlowNet2: correlation and backward warping, as torch custom ops.

They are registered with `torch.library` so that `torch.export` keeps each as one node
(`edgeflow::correlation`, `edgeflow::warp`) for the compiler to replace with its own TIR.
Both have a pure-torch implementation used for training and as the numerical reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgeflow.models.shapes import correlation_output_size


def correlation_reference(f1: torch.Tensor, f2: torch.Tensor, kernel_size: int = 1,
                          max_displacement: int = 20, stride1: int = 1, stride2: int = 2,
                          pad: int = 20) -> torch.Tensor:
    """FlowNet correlation as Caffe's CorrelationLayer computes it.

    f1, f2: [B, C, H, W]. Returns [B, D*D, Ho, Wo] with D = 2*(max_displacement//stride2)+1;
    channel (p+R)*D + (o+R) holds the displacement (dy, dx) = (p*stride2, o*stride2),
    R = max_displacement//stride2. Each value is the sum over channels and the kernel window
    of f1*f2, divided by kernel_size**2 * C. Outside the padded input counts as zero.
    """
    b, c, h, w = f1.shape
    out_h, out_w = correlation_output_size(h, w, kernel_size=kernel_size,
                                           max_displacement=max_displacement, stride1=stride1, pad=pad)
    radius = max_displacement // stride2
    p1 = F.pad(f1, (pad, pad, pad, pad))
    p2 = F.pad(f2, (pad, pad, pad, pad))
    k = kernel_size
    span_h = (out_h - 1) * stride1 + 1
    span_w = (out_w - 1) * stride1 + 1
    outs = []
    for p in range(-radius, radius + 1):
        for o in range(-radius, radius + 1):
            acc = None
            for ky in range(k):
                for kx in range(k):
                    y0, x0 = max_displacement + ky, max_displacement + kx
                    a = p1[:, :, y0:y0 + span_h:stride1, x0:x0 + span_w:stride1]
                    y2, x2 = y0 + p * stride2, x0 + o * stride2
                    bb = p2[:, :, y2:y2 + span_h:stride1, x2:x2 + span_w:stride1]
                    term = (a * bb).sum(1)
                    acc = term if acc is None else acc + term
            outs.append(acc)
    return torch.stack(outs, 1) / float(k * k * c)


def warp_sample_points(flow: torch.Tensor):
    """FlowWarp's sample points of flow [B, 2, H, W] (px): (x2, y2) [B, H, W] and the mask of those
    inside [0, W) x [0, H) (False for NaN)."""
    _, _, h, w = flow.shape
    ys = torch.arange(h, dtype=flow.dtype, device=flow.device).view(1, h, 1)
    xs = torch.arange(w, dtype=flow.dtype, device=flow.device).view(1, 1, w)
    x2 = xs + flow[:, 0]
    y2 = ys + flow[:, 1]
    return x2, y2, (x2 >= 0) & (y2 >= 0) & (x2 < w) & (y2 < h)


def warp_reference(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward bilinear warp exactly as Caffe's FlowWarp layer: out(x, y) = image(x + u, y + v).

    image: [B, C, H, W]; flow: [B, 2, H, W] in pixels (u right, v down). As FlowWarp
    (lmb-freiburg/flownet2 flow_warp_layer.cpp/.cu, fill_value ZERO): a sample point (x2, y2) with
    x2 < 0, y2 < 0, x2 >= W or y2 >= H (or NaN) gives 0; inside, the left/top neighbour is
    floor(x2)/floor(y2), the right/bottom one is clamped to column W-1/row H-1, and the result is
    (1-a)(1-b)TL + a(1-b)TR + (1-a)bBL + abBR with a = x2 - floor(x2), b = y2 - floor(y2).
    """
    b, c, h, w = image.shape
    x2, y2, inside = warp_sample_points(flow)
    # points outside sample (0, 0) and are masked: finite weights, gathers in range, no gradient
    x2 = torch.where(inside, x2, torch.zeros_like(x2))
    y2 = torch.where(inside, y2, torch.zeros_like(y2))
    xl = torch.floor(x2)
    yt = torch.floor(y2)
    alpha = x2 - xl
    beta = y2 - yt
    xl = xl.long()
    yt = yt.long()
    xr = (xl + 1).clamp(max=w - 1)
    yb = (yt + 1).clamp(max=h - 1)
    flat = image.reshape(b, c, h * w)

    def at(yi, xi):
        return torch.gather(flat, 2, (yi * w + xi).view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)

    alpha = alpha.unsqueeze(1)
    beta = beta.unsqueeze(1)
    out = ((1 - alpha) * (1 - beta) * at(yt, xl) + alpha * (1 - beta) * at(yt, xr)
           + (1 - alpha) * beta * at(yb, xl) + alpha * beta * at(yb, xr))
    return torch.where(inside.unsqueeze(1), out, torch.zeros_like(out))


@torch.library.custom_op("edgeflow::correlation", mutates_args=())
def correlation(f1: torch.Tensor, f2: torch.Tensor, kernel_size: int = 1, max_displacement: int = 20,
                stride1: int = 1, stride2: int = 2, pad: int = 20) -> torch.Tensor:
    """Custom-op form of `correlation_reference` (one node under torch.export)."""
    return correlation_reference(f1, f2, kernel_size, max_displacement, stride1, stride2, pad)


@correlation.register_fake
def _(f1, f2, kernel_size=1, max_displacement=20, stride1=1, stride2=2, pad=20):
    out_h, out_w = correlation_output_size(f1.shape[2], f1.shape[3], kernel_size=kernel_size,
                                           max_displacement=max_displacement, stride1=stride1, pad=pad)
    d = 2 * (max_displacement // stride2) + 1
    return f1.new_empty(f1.shape[0], d * d, out_h, out_w)


@torch.library.custom_op("edgeflow::warp", mutates_args=())
def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Custom-op form of `warp_reference` (one node under torch.export)."""
    return warp_reference(image, flow)


@warp.register_fake
def _(image, flow):
    return torch.empty_like(image)


def _register_recompute_autograd(op, reference, n_tensors: int) -> None:
    """Autograd for a custom op: re-run its pure-torch reference and differentiate that."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors])
        ctx.args = inputs[n_tensors:]

    def backward(ctx, grad):
        tensors = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = reference(*tensors, *ctx.args)
        grads = torch.autograd.grad(out, tensors, grad)
        return (*grads, *([None] * len(ctx.args)))

    op.register_autograd(backward, setup_context=setup_context)


_register_recompute_autograd(correlation, correlation_reference, 2)
_register_recompute_autograd(warp, warp_reference, 2)
