"""FlowNet2 models: `create(name, weights="default"|path|None) -> torch.nn.Module`.

`module(img1, img2)` takes float [B,3,H,W] RGB in [0,1] (H, W multiples of 64) and returns
forward flow [B,2,H,W] in pixels. Importing this package does not import torch.
"""

from __future__ import annotations

from edgeflow.models.registry import DEFAULT_MODEL, SPECS, ModelSpec, spec

__all__ = ["create", "names", "spec", "SPECS", "ModelSpec", "DEFAULT_MODEL"]

# Weight-file meta key of the fixed per-image RGB input means of imported Caffe weights,
# {"img1": [r, g, b], "img2": [r, g, b]} in [0, 1] units (written by edgeflow.models.caffe.convert).
CAFFE_MEAN_KEY = "caffe_mean_rgb"
# Weight-file meta key of a pruned network's pruning report (edgeflow.compile.prune); its layer
# channel counts are under `edgeflow.models.channels.META_KEY`.
PRUNING_KEY = "pruning"


def names() -> list[str]:
    """Registry names in registry order."""
    return list(SPECS)


def create(name: str = DEFAULT_MODEL, weights="default"):
    """Build model `name` in eval mode.

    weights: "default" loads the weights edgeflow ships for `name` (an error if there are none),
    the name of a checkpoint shipped beside them (`edgeflow models`; e.g. "pruned-0.3") loads
    that one, a path loads an edgeflow weight file, None leaves the He-initialised random weights.
    A pruned network's weight file (`edgeflow prune`) rebuilds the layers with its channel counts
    and sets `model.pruning` to its pruning report. Weights imported from Caffe carry the fixed
    input means of the official network in their meta (`caffe_mean_rgb`); the model then
    subtracts those, as Caffe does, instead of each pair's own mean (`FlowNet2.input_mean`).
    """
    from edgeflow.errors import InputError
    from edgeflow.models.stack import FlowNet2
    from edgeflow.models.weights import load_into

    s = spec(name)
    model = FlowNet2(s.stages, s.width)
    if weights is not None:
        meta = load_into(model, name, weights)
        model.pruning = meta.get(PRUNING_KEY)
        mean = meta.get(CAFFE_MEAN_KEY)
        if mean:
            try:
                model.input_mean = (mean["img1"], mean["img2"])
            except (KeyError, TypeError, ValueError):
                raise InputError(f"weights {str(weights)!r}: meta {CAFFE_MEAN_KEY!r} is not "
                                 f"{{'img1': [r, g, b], 'img2': [r, g, b]}}: {mean!r}") from None
    return model.eval()
