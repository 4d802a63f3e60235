"""FlowNet2 stacks: a FlowNetS or FlowNetC followed by FlowNetS stages that refine the flow.

A stacked stage sees 12 channels: img1, img2, img2 warped by the previous flow, the previous
flow (/20) and the brightness error |img1 - warped img2| (FlowNet2's ChannelNorm).

The flow resampling follows the official Caffe networks (lmb-freiburg/flownet2 deploy prototxts):
between stages an Accum layer with a reference blob brings flow2 x20 to the image size with
corner-aligned sample points (`accum_upsample`); the output is a Resample LINEAR of flow2 x20,
half-pixel centres (`upsample_flow`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeflow.errors import InputError
from edgeflow.models.flownet import DIV_FLOW, FlowNetC, FlowNetS
from edgeflow.models.ops import warp


def stage_names(stages: str) -> list[str]:
    """'css' -> ['flownetc', 'flownets_1', 'flownets_2'] (flownet2-pytorch's names)."""
    first = {"s": "flownets", "c": "flownetc"}[stages[0]]
    return [first] + [f"flownets_{i}" for i in range(1, len(stages))]


class FlowNet2(nn.Module):
    """A FlowNet2 network: `module(img1, img2) -> flow`.

    img1, img2: float [B, 3, H, W], RGB in [0, 1], H and W multiples of 64.
    Returns forward flow [B, 2, H, W] in pixels (u right, v down).
    `stages` is a string of 's' and 'c' ('s', 'ss', 'c', 'cs', 'css'); `width` the channel
    multiplier (0.375 for the lower-case FlowNet2 models). `input_mean` is what is subtracted
    from the images first: None, each pair's own per-channel mean (flownet2-pytorch, and the
    weights edgeflow trains); or fixed RGB means `(img1 [r, g, b], img2 [r, g, b])`, as Caffe's
    DataAugmentation layers subtract them (imported Caffe weights; see `edgeflow.models.create`).
    It is not a parameter: weight files carry it in their meta. `pruning` is None, or for a
    pruned network the report of `edgeflow.compile.prune` (ratio, parameters, MACs, distillation).
    """

    def __init__(self, stages: str, width: float, input_mean=None):
        super().__init__()
        if not stages or stages[0] not in "sc" or set(stages[1:]) - {"s"}:
            raise InputError(f"stages must be 's' or 'c' followed by 's'*, got {stages!r}")
        self.stages = stages
        self.width = width
        self.names = stage_names(stages)
        for i, name in enumerate(self.names):
            if i == 0 and stages[0] == "c":
                net = FlowNetC(width=width)
            else:
                net = FlowNetS(in_channels=6 if i == 0 else 12, width=width)
            self.add_module(name, net)
        self.input_mean = input_mean
        self.pruning: dict | None = None

    @property
    def input_mean(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        return self._input_mean

    @input_mean.setter
    def input_mean(self, value) -> None:
        if value is not None:
            value = tuple(tuple(float(v) for v in rgb) for rgb in value)
            if len(value) != 2 or any(len(rgb) != 3 for rgb in value):
                raise InputError(f"input_mean must be two RGB triples (img1, img2), got {value!r}")
        self._input_mean = value

    def normalize(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] x2 in [0,1] -> [B,6,H,W] with the mean of `input_mean` removed."""
        x = torch.cat((img1, img2), 1)
        if self._input_mean is not None:
            mean = torch.tensor(self._input_mean[0] + self._input_mean[1], dtype=x.dtype, device=x.device)
            return x - mean.view(1, 6, 1, 1)
        mean = (img1.mean((2, 3), keepdim=True) + img2.mean((2, 3), keepdim=True)) * 0.5
        return x - mean.repeat(1, 2, 1, 1)

    def check_size(self, img1: torch.Tensor, img2: torch.Tensor) -> None:
        if img1.shape != img2.shape or img1.dim() != 4 or img1.shape[1] != 3:
            raise InputError(f"expected two [B,3,H,W] images of one shape, got {tuple(img1.shape)} "
                             f"and {tuple(img2.shape)}")
        h, w = img1.shape[2:]
        if h % 64 or w % 64:
            raise InputError(f"image size {h}x{w} is not a multiple of 64")

    def pyramids(self, img1: torch.Tensor, img2: torch.Tensor, *, train_from: int = 0):
        """Run every stage; returns the last stage's flow pyramid [flow2..flow6] (pixels/20).

        Stages before `train_from` run without gradients (frozen, as FlowNet2 trains stacks).
        """
        x = self.normalize(img1, img2)
        flow = None
        pyramid = None
        for i, name in enumerate(self.names):
            net = getattr(self, name)
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= train_from):
                if i == 0:
                    pyramid = net(x)
                else:
                    warped = warp(x[:, 3:6], flow)
                    err = torch.sqrt(((x[:, :3] - warped) ** 2).sum(1, keepdim=True) + 1e-12)
                    pyramid = net(torch.cat((x, warped, flow * (1 / DIV_FLOW), err), 1))
                if i + 1 < len(self.names):
                    flow = accum_upsample(pyramid[0] * DIV_FLOW, x.shape[2:])
                    flow = flow.detach() if i < train_from else flow
        return pyramid

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        self.check_size(img1, img2)
        return upsample_flow(self.pyramids(img1, img2)[0] * DIV_FLOW, 4)


def upsample_flow(flow: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear upsampling of a [B,2,h,w] field by an integer factor (values unchanged), with
    half-pixel centres: Caffe's Resample LINEAR when upsampling (resample_layer.cu,
    x_in = (x_out + 0.5) * w/W - 0.5, edge neighbours renormalised), the networks' output layer."""
    return F.interpolate(flow, scale_factor=factor, mode="bilinear", align_corners=False)


def accum_upsample(flow: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resampling of a [B,2,h,w] field to `size` (H, W) (values unchanged) with corner-
    aligned sample points x_in = x_out * (w-1)/(W-1): Caffe's Accum layer with a reference blob
    (accum_layer.cpp/.cu), which FlowNet2 stacks use to bring a stage's flow to the image size."""
    return F.interpolate(flow, size=tuple(int(s) for s in size), mode="bilinear", align_corners=True)
