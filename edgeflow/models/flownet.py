"""FlowNetS and FlowNetC, with a width multiplier, named as in flownet2-pytorch.

Both return the flow pyramid [flow2, flow3, flow4, flow5, flow6]: flowK is [B, 2, H/2^K, W/2^K]
in units of pixels/20 at the input resolution (FlowNet's `div_flow`), as the networks were
trained. Parameter names (conv1.0.weight, predict_flow6.weight, upsampled_flow6_to_5.weight, ...)
match flownet2-pytorch so its checkpoints map one to one.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeflow.models.ops import correlation

LEAKY_SLOPE = 0.1
DIV_FLOW = 20.0  # the pyramid holds flow / DIV_FLOW (FlowNet's `div_flow`)


def _conv(cin: int, cout: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, stride, padding=(kernel_size - 1) // 2, bias=True),
        nn.LeakyReLU(LEAKY_SLOPE),
    )


def _deconv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=True), nn.LeakyReLU(LEAKY_SLOPE))


def _predict_flow(cin: int) -> nn.Conv2d:
    return nn.Conv2d(cin, 2, 3, 1, 1, bias=True)


def _upsample_flow() -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(2, 2, 4, 2, 1, bias=False)


def scaled(channels: int, width: float) -> int:
    """Channel count of a layer with `channels` at full width, at width multiplier `width`."""
    return max(1, int(round(channels * width)))


class _FlowNetBase(nn.Module):
    """conv4..conv6_1 and the refinement decoder shared by FlowNetS and FlowNetC."""

    def __init__(self, width: float):
        super().__init__()
        c = lambda n: scaled(n, width)  # noqa: E731
        self.width = width
        self.conv4 = _conv(c(256), c(512), stride=2)
        self.conv4_1 = _conv(c(512), c(512))
        self.conv5 = _conv(c(512), c(512), stride=2)
        self.conv5_1 = _conv(c(512), c(512))
        self.conv6 = _conv(c(512), c(1024), stride=2)
        self.conv6_1 = _conv(c(1024), c(1024))

        self.deconv5 = _deconv(c(1024), c(512))
        self.deconv4 = _deconv(c(512) + c(512) + 2, c(256))
        self.deconv3 = _deconv(c(512) + c(256) + 2, c(128))
        self.deconv2 = _deconv(c(256) + c(128) + 2, c(64))

        self.predict_flow6 = _predict_flow(c(1024))
        self.predict_flow5 = _predict_flow(c(512) + c(512) + 2)
        self.predict_flow4 = _predict_flow(c(512) + c(256) + 2)
        self.predict_flow3 = _predict_flow(c(256) + c(128) + 2)
        self.predict_flow2 = _predict_flow(c(128) + c(64) + 2)

        self.upsampled_flow6_to_5 = _upsample_flow()
        self.upsampled_flow5_to_4 = _upsample_flow()
        self.upsampled_flow4_to_3 = _upsample_flow()
        self.upsampled_flow3_to_2 = _upsample_flow()

    def init_weights(self) -> None:
        """He initialisation for leaky ReLU, zero biases, bilinear flow upsampling."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for name in ("upsampled_flow6_to_5", "upsampled_flow5_to_4", "upsampled_flow4_to_3",
                     "upsampled_flow3_to_2"):
            w = getattr(self, name).weight
            with torch.no_grad():
                w.zero_()
                k = torch.tensor([0.25, 0.75, 0.75, 0.25])
                w[0, 0] = k[:, None] * k[None, :]
                w[1, 1] = k[:, None] * k[None, :]
        for head in (self.predict_flow6, self.predict_flow5, self.predict_flow4, self.predict_flow3,
                     self.predict_flow2):
            with torch.no_grad():
                head.weight.mul_(0.1)

    def decode(self, out_conv2: torch.Tensor, out_conv3: torch.Tensor) -> list[torch.Tensor]:
        """Encoder levels 2 and 3 (after conv3_1) -> [flow2, ..., flow6]."""
        out_conv4 = self.conv4_1(self.conv4(out_conv3))
        out_conv5 = self.conv5_1(self.conv5(out_conv4))
        out_conv6 = self.conv6_1(self.conv6(out_conv5))

        flow6 = self.predict_flow6(out_conv6)
        concat5 = torch.cat((out_conv5, self.deconv5(out_conv6), self.upsampled_flow6_to_5(flow6)), 1)
        flow5 = self.predict_flow5(concat5)
        concat4 = torch.cat((out_conv4, self.deconv4(concat5), self.upsampled_flow5_to_4(flow5)), 1)
        flow4 = self.predict_flow4(concat4)
        concat3 = torch.cat((out_conv3, self.deconv3(concat4), self.upsampled_flow4_to_3(flow4)), 1)
        flow3 = self.predict_flow3(concat3)
        concat2 = torch.cat((out_conv2, self.deconv2(concat3), self.upsampled_flow3_to_2(flow3)), 1)
        flow2 = self.predict_flow2(concat2)
        return [flow2, flow3, flow4, flow5, flow6]


class FlowNetS(_FlowNetBase):
    """FlowNetSimple: x [B, in_channels, H, W] (H, W multiples of 64) -> flow pyramid."""

    def __init__(self, in_channels: int = 6, width: float = 1.0):
        super().__init__(width)
        c = lambda n: scaled(n, width)  # noqa: E731
        self.conv1 = _conv(in_channels, c(64), kernel_size=7, stride=2)
        self.conv2 = _conv(c(64), c(128), kernel_size=5, stride=2)
        self.conv3 = _conv(c(128), c(256), kernel_size=5, stride=2)
        self.conv3_1 = _conv(c(256), c(256))
        self.init_weights()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out_conv2 = self.conv2(self.conv1(x))
        out_conv3 = self.conv3_1(self.conv3(out_conv2))
        return self.decode(out_conv2, out_conv3)


class FlowNetC(_FlowNetBase):
    """FlowNetCorr: siamese conv1..conv3 on each image, correlation (kernel 1, displacement 20,
    stride2 2: 441 channels at 1/8 resolution) beside a `conv_redir` of the first image.

    x: [B, 6, H, W] (both images stacked on channels) -> flow pyramid.
    """

    MAX_DISPLACEMENT = 20
    STRIDE2 = 2

    def __init__(self, width: float = 1.0):
        super().__init__(width)
        c = lambda n: scaled(n, width)  # noqa: E731
        self.conv1 = _conv(3, c(64), kernel_size=7, stride=2)
        self.conv2 = _conv(c(64), c(128), kernel_size=5, stride=2)
        self.conv3 = _conv(c(128), c(256), kernel_size=5, stride=2)
        self.conv_redir = _conv(c(256), c(32), kernel_size=1)
        grid = 2 * (self.MAX_DISPLACEMENT // self.STRIDE2) + 1
        self.corr_activation = nn.LeakyReLU(LEAKY_SLOPE)
        self.conv3_1 = _conv(c(32) + grid * grid, c(256))
        self.init_weights()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        pair = torch.cat((x[:, :3], x[:, 3:6]), 0)  # both towers in one batch: same weights
        out_conv2_pair = self.conv2(self.conv1(pair))
        out_conv3_pair = self.conv3(out_conv2_pair)
        n = x.shape[0]
        out_conv2a = out_conv2_pair[:n]
        out_conv3a, out_conv3b = out_conv3_pair[:n], out_conv3_pair[n:]
        corr = correlation(out_conv3a, out_conv3b, 1, self.MAX_DISPLACEMENT, 1, self.STRIDE2,
                           self.MAX_DISPLACEMENT)
        in_conv3_1 = torch.cat((self.conv_redir(out_conv3a), self.corr_activation(corr)), 1)
        return self.decode(out_conv2a, self.conv3_1(in_conv3_1))
