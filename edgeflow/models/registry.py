"""The registry of FlowNet2 models, keyed by short lowercase names (upper case = full width)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: `stages` as in FlowNet2 ('s', 'c', 'ss', ...), channel `width`."""

    name: str
    stages: str
    width: float
    description: str


SPECS = {s.name: s for s in (
    ModelSpec("flownet2-s", "s", 0.375, "FlowNet2-s: FlowNetS at 3/8 width"),
    ModelSpec("flownet2-ss", "ss", 0.375, "FlowNet2-ss: two stacked FlowNetS at 3/8 width"),
    ModelSpec("flownet2-c", "c", 0.375, "FlowNet2-c: FlowNetC at 3/8 width"),
    ModelSpec("flownet2-cs", "cs", 0.375, "FlowNet2-cs: FlowNetC + FlowNetS at 3/8 width"),
    ModelSpec("flownet2-css", "css", 0.375, "FlowNet2-css: FlowNetC + 2 FlowNetS at 3/8 width"),
    ModelSpec("flownet2-S", "s", 1.0, "FlowNet2-S: FlowNetS at full width"),
    ModelSpec("flownet2-C", "c", 1.0, "FlowNet2-C: FlowNetC at full width"),
)}

DEFAULT_MODEL = "flownet2-s"


def spec(name: str) -> ModelSpec:
    """The entry for `name`; an InputError listing the choices if there is none."""
    from edgeflow.errors import choices_error

    if name not in SPECS:
        raise choices_error("model", name, SPECS)
    return SPECS[name]
