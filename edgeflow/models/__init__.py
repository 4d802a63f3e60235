"""FlowNet2 models: `create(name, weights="default"|path|None) -> torch.nn.Module`.

`module(img1, img2)` takes float [B,3,H,W] RGB in [0,1] (H, W multiples of 64) and returns
forward flow [B,2,H,W] in pixels. Importing this package does not import torch.
"""

from __future__ import annotations

from edgeflow.models.registry import DEFAULT_MODEL, SPECS, ModelSpec, spec

__all__ = ["create", "names", "spec", "SPECS", "ModelSpec", "DEFAULT_MODEL"]


def names() -> list[str]:
    """Registry names in registry order."""
    return list(SPECS)


def create(name: str = DEFAULT_MODEL, weights="default"):
    """Build model `name` in eval mode.

    weights: "default" loads the weights edgeflow ships for `name` (an error if there are none),
    a path loads an edgeflow weight file, None leaves the He-initialised random weights.
    """
    from edgeflow.models.stack import FlowNet2
    from edgeflow.models.weights import load_into

    s = spec(name)
    model = FlowNet2(s.stages, s.width)
    if weights is not None:
        load_into(model, name, weights)
    return model.eval()
