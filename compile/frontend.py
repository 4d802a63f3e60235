"""Frontend: a torch FlowNet2 model -> a Relax IRModule with detached parameters.

`torch.export` keeps the custom ops `edgeflow::correlation` and `edgeflow::warp` as single
nodes; they are mapped to our own TIR functions through `custom_convert_map`.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeflow.errors import InputError


@dataclass
class RelaxModel:
    """The imported network: `mod["main"](img1, img2, *params) -> flow`, NCHW float32."""

    mod: object  # tvm.IRModule
    params: list  # numpy arrays, in the order of main's parameters after the two images
    param_names: list[str]


def check_size(input_size) -> tuple[int, int]:
    """(H, W) of `input_size`; InputError unless both are positive multiples of 64."""
    h, w = (int(v) for v in input_size)
    if h % 64 or w % 64 or h <= 0 or w <= 0:
        raise InputError(f"input_size={h}x{w}: height and width must be positive multiples of 64, e.g. 448x1024")
    return h, w


def to_relax(model, input_size: tuple[int, int]) -> RelaxModel:
    """Export `model` (module(img1, img2) -> flow) at `input_size` (H, W) and import it to Relax.

    Raises InputError listing every torch op the importer does not support, in one message.
    """
    import torch
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from edgeflow.compile.ops import CUSTOM_CONVERT_MAP

    h, w = check_size(input_size)
    example = (torch.zeros(1, 3, h, w), torch.zeros(1, 3, h, w))
    with torch.no_grad():
        ep = torch.export.export(model.eval(), example)
    names = [s.target for s in ep.graph_signature.input_specs if s.kind.name in ("PARAMETER", "BUFFER")]
    try:
        mod = from_exported_program(ep, keep_params_as_input=True, custom_convert_map=dict(CUSTOM_CONVERT_MAP))
    except AssertionError as e:
        if "Unsupported function types" in str(e):
            raise InputError(f"the TVM importer does not support these torch ops: {str(e).split('types', 1)[1].strip()}") from None
        raise
    mod, params = relax.frontend.detach_params(mod)
    return RelaxModel(mod, [p.numpy() for p in params["main"]], names)
