"""The fake-quant int8 layers: torch custom ops `edgeflow::qconv2d` / `edgeflow::qdeconv2d` and
the modules that call them. Host side only (imports torch).

Each op is one quantized layer, the reference the compiled int8 kernels (`quantize_ops`) must
agree with:

    xq  = clamp(round(x / a_scale) + zero_point, 0, 255)        uint8 activations, per tensor
    y   = conv(xq - zero_point, weight) * (a_scale * w_scale[o]) + bias[o]   int8 weights, per channel
    out = leaky_relu(y, slope)                                  slope 1: none

`torch.export` keeps each as a single node; the frontend maps it to the int8 kernels. The eager
implementation (float arithmetic on the integer values, exact up to float rounding) is the
fake-quant model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QMIN, QMAX = 0, 255  # activations: uint8, asymmetric
WMAX = 127  # weights: int8, symmetric, [-127, 127]


def fake_quant(x: torch.Tensor, a_scale: float, zero_point: int) -> torch.Tensor:
    """x rounded to its uint8 grid (round half to even), as float integers minus the zero point."""
    return torch.clamp(torch.round(x / a_scale) + zero_point, QMIN, QMAX) - zero_point


def _dequantize(y: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, a_scale: float, slope: float):
    y = y * (a_scale * w_scale).view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    return y if slope == 1.0 else F.leaky_relu(y, slope)


@torch.library.custom_op("edgeflow::qconv2d", mutates_args=())
def qconv2d(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, a_scale: float,
            zero_point: int, stride: int, padding: int, slope: float) -> torch.Tensor:
    """Quantized convolution: x float NCHW, weight int8 OIHW, w_scale/bias float [O]."""
    y = F.conv2d(fake_quant(x, a_scale, zero_point), weight.float(), None, stride, padding)
    return _dequantize(y, w_scale, bias, a_scale, slope)


@qconv2d.register_fake
def _(x, weight, w_scale, bias, a_scale, zero_point, stride, padding, slope):
    o, _, kh, kw = weight.shape
    h = (x.shape[2] + 2 * padding - kh) // stride + 1
    w = (x.shape[3] + 2 * padding - kw) // stride + 1
    return x.new_empty(x.shape[0], o, h, w)


@torch.library.custom_op("edgeflow::qdeconv2d", mutates_args=())
def qdeconv2d(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, a_scale: float,
              zero_point: int, stride: int, padding: int, slope: float) -> torch.Tensor:
    """Quantized transposed convolution: x float NCHW, weight int8 IOHW, w_scale/bias float [O]."""
    y = F.conv_transpose2d(fake_quant(x, a_scale, zero_point), weight.float(), None, stride, padding)
    return _dequantize(y, w_scale, bias, a_scale, slope)


@qdeconv2d.register_fake
def _(x, weight, w_scale, bias, a_scale, zero_point, stride, padding, slope):
    _, o, kh, kw = weight.shape
    h = (x.shape[2] - 1) * stride - 2 * padding + kh
    w = (x.shape[3] - 1) * stride - 2 * padding + kw
    return x.new_empty(x.shape[0], o, h, w)


def activation_params(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of the uint8 grid covering [lo, hi] (widened to hold 0 exactly)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max(hi - lo, 1e-8) / (QMAX - QMIN)
    return scale, int(min(max(round(-lo / scale), QMIN), QMAX))


class QuantConv(nn.Module):
    """A Conv2d or ConvTranspose2d (+ its LeakyReLU) quantized: int8 weights per output channel,
    uint8 input per tensor. `layer`: the float layer; (lo, hi): the input range to cover."""

    def __init__(self, layer: nn.Module, lo: float, hi: float, slope: float = 1.0):
        super().__init__()
        self.deconv = isinstance(layer, nn.ConvTranspose2d)
        w = layer.weight.detach().float()
        per_out = w.transpose(0, 1) if self.deconv else w  # [O, I, kh, kw]
        w_scale = per_out.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / WMAX
        shape = (1, -1, 1, 1) if self.deconv else (-1, 1, 1, 1)
        # parameters (frozen), not buffers: torch.export then hands them to the frontend as
        # parameters, whose packing `lower.prepare` runs once at compile time
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.weight = frozen(torch.clamp(torch.round(w / w_scale.view(shape)), -WMAX, WMAX).to(torch.int8))
        self.w_scale = frozen(w_scale)
        self.bias = frozen(layer.bias.detach().float() if layer.bias is not None else torch.zeros(per_out.shape[0]))
        self.a_scale, self.zero_point = activation_params(lo, hi)
        self.stride, self.padding, self.slope = int(layer.stride[0]), int(layer.padding[0]), float(slope)
        self.range = (float(lo), float(hi))

    def forward(self, x):
        op = torch.ops.edgeflow.qdeconv2d if self.deconv else torch.ops.edgeflow.qconv2d
        return op(x, self.weight, self.w_scale, self.bias, self.a_scale, self.zero_point, self.stride,
                  self.padding, self.slope)

    def extra_repr(self) -> str:
        kind = "deconv" if self.deconv else "conv"
        return (f"{kind}, int8 weights {tuple(self.weight.shape)}, a_scale={self.a_scale:.4g}, "
                f"zero_point={self.zero_point}, slope={self.slope}")
