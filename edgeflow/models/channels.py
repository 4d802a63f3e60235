"""Per-layer channel counts of a network, read and applied: what makes a pruned net reloadable.

A pruned FlowNet2 has the registry's layers with fewer channels. Its weight file records
`{layer name: [in_channels, out_channels]}` of every convolution and deconvolution (meta key
`channels`); `set_channels` rebuilds those layers of a freshly created model with these counts
before the weights are loaded, so the file loads weights-only (no pickled modules).
"""

from __future__ import annotations

from edgeflow.errors import InputError

META_KEY = "channels"


def conv_layers(model) -> dict:
    """{qualified name: module} of every Conv2d and ConvTranspose2d of `model`, in order."""
    from torch import nn

    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))}


def layer_channels(model) -> dict[str, list[int]]:
    """{layer name: [in_channels, out_channels]} of every convolution and deconvolution."""
    return {name: [m.in_channels, m.out_channels] for name, m in conv_layers(model).items()}


def set_channels(model, channels: dict, source: str = "channels") -> None:
    """Rebuild each layer of `model` named in `channels` ({name: [in, out]}) whose counts differ,
    with the same kernel, stride, padding and bias, and new (uninitialised) weights.

    Every entry is checked before any layer changes: InputError naming `source` and the first
    unknown layer or count that is not a pair of positive integers.
    """
    layers = conv_layers(model)
    for name, counts in channels.items():
        if name not in layers:
            raise InputError(f"{source}: unknown layer {name!r} (the model's layers: {', '.join(list(layers)[:3])}, ...)")
        if (not isinstance(counts, (list, tuple)) or len(counts) != 2
                or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts)):
            raise InputError(f"{source}: layer {name!r} has channels {counts!r}, expected [in, out] positive integers")
    for name, (cin, cout) in channels.items():
        old = layers[name]
        if (old.in_channels, old.out_channels) == (cin, cout):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _resized(old, cin, cout))


def _resized(layer, cin: int, cout: int):
    """A layer of the type and geometry of `layer` with `cin` inputs and `cout` outputs."""
    from torch import nn

    kw = dict(kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
              groups=layer.groups, bias=layer.bias is not None)
    if isinstance(layer, nn.ConvTranspose2d):
        return nn.ConvTranspose2d(cin, cout, output_padding=layer.output_padding, **kw)
    return nn.Conv2d(cin, cout, **kw)
