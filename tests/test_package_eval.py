"""`edgeflow eval PACKAGE` gives the torch model's EPE to within 0.01 px (host CPU packages).

The networks are randomly initialised with amplified flow heads, so they predict flows of
several pixels and the stacks' warps move real image content; the same weight file feeds the
torch model and the compiler.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.tvm
SIZE = (64, 128)
FLOW_GAIN = 10.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from edgeflow.synth import write_chairs

    return write_chairs(tmp_path_factory.mktemp("chairs"), 3, size=(96, 160), seed=5, progress=False)


def _weights(name: str, path) -> str:
    from edgeflow.models import create
    from edgeflow.models.weights import save

    torch.manual_seed(3)
    model = create(name, weights=None)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".predict_flow" in pname:
                p.mul_(FLOW_GAIN)
    save(model, name, path, half=False)
    return str(path)


@pytest.mark.parametrize("name", ["flownet2-s", "flownet2-ss", "flownet2-css"])
def test_package_eval_matches_torch(name, data, tmp_path):
    from edgeflow.compile import compile
    from edgeflow.evaluate import evaluate

    weights = _weights(name, tmp_path / f"{name}.pt")
    package = compile(name, target="host", input_size=SIZE, weights=weights, out=tmp_path / f"{name}.tar").path
    want = evaluate(name, data, weights=weights, size=SIZE, progress=False)
    got = evaluate(str(package), data, progress=False)
    assert want["epe"] > 1.0  # the amplified heads predict real motion, not ~0
    assert abs(got["epe"] - want["epe"]) < 0.01
