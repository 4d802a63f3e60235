"""What a network costs: parameters, and multiply-accumulates of its convolutions per frame pair.

    cost(model, (h, w)) -> {"parameters": int, "macs": int, "input_size": [h, w]}

MACs count the Conv2d and ConvTranspose2d layers, where FlowNet spends nearly all its work:
a convolution does in/groups x kh x kw MACs per output value, a deconvolution out/groups x kh x
kw per input value (each input pixel scatters one kernel onto the output), i.e. weight elements
x output (convolution) or input (deconvolution) positions. Correlation, warp, activations and
resampling are not counted. FLOPs are about 2 x MACs (a multiply and an add).
"""

from __future__ import annotations


def count_parameters(model) -> int:
    """Number of parameter values of `model`."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model, input_size: tuple[int, int]) -> int:
    """MACs of the convolutions and deconvolutions of `model(img1, img2)` for one pair of
    [1,3,H,W] images, `input_size` = (H, W), counted by forward hooks on a real call."""
    import torch
    from torch import nn

    total = 0

    def hook(layer, inputs, output):
        nonlocal total
        positions = inputs[0].shape[2:] if isinstance(layer, nn.ConvTranspose2d) else output.shape[2:]
        total += inputs[0].shape[0] * layer.weight.numel() * positions.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        images = torch.zeros(1, 3, *input_size)
        with torch.no_grad():
            model(images, images)
    finally:
        for h in handles:
            h.remove()
    return int(total)


def cost(model, input_size: tuple[int, int]) -> dict:
    """{"parameters", "macs" (convolutions, one pair at input_size), "input_size": [H, W]}."""
    return {"parameters": count_parameters(model), "macs": count_macs(model, input_size),
            "input_size": [int(v) for v in input_size]}
