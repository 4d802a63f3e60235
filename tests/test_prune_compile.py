"""Pruned networks through the compiler: flownet2-ss for the host and the Jetson, the manifest's
pruning and cost entries, `compile(prune=, calibration=)`, inspect and the rebuilt torch model."""

from __future__ import annotations

import functools
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import torch

from edgeflow.cli import main
from edgeflow.compile.cost import count_macs, count_parameters
from edgeflow.compile.prune import prune, save
from edgeflow.errors import InputError
from edgeflow.models import create
from edgeflow.models.channels import layer_channels

pytestmark = pytest.mark.tvm
SIZE = (64, 128)


def manifest_of(path):
    with tarfile.open(os.fspath(path)) as tar:
        return json.load(tar.extractfile("manifest.json"))


@pytest.fixture(scope="module")
def pruned_ss(tmp_path_factory):
    """flownet2-ss (shipped weights) pruned by 0.3 with a few distillation steps, as a weight file."""
    model = prune(create("flownet2-ss"), 0.3, distill_steps=2, batch=1, size=SIZE, validation_pairs=2)
    path = tmp_path_factory.mktemp("w") / "ss-pruned.pt"
    save(model, "flownet2-ss", path)
    return model, path


def test_pruned_ss_on_the_host_matches_its_torch_model(pruned_ss, tmp_path):
    from edgeflow.benchmark import model_from_package
    from edgeflow.runtime import load
    from edgeflow.synth import generate_pair
    from edgeflow.training import to_tensor_pair

    model, weights = pruned_ss
    out = tmp_path / "ss-host.tar"
    assert main(["compile", "flownet2-ss", "--weights", str(weights), "--target", "host", "--size", "64x128",
                 "-o", str(out)]) == 0
    manifest = manifest_of(out)
    assert manifest["accuracy"]["epe_vs_torch"] < 0.01
    assert manifest["pruning"]["channels"] == layer_channels(model)
    assert manifest["pruning"]["parameters"] == model.pruning["parameters"]
    assert manifest["cost"] == {"parameters": count_parameters(model), "macs": count_macs(model, SIZE),
                                "input_size": list(SIZE)}
    # the package against the torch model, on a pair of its own
    img1, img2, _ = generate_pair(np.random.default_rng(7), SIZE)
    with torch.no_grad():
        want = model(*to_tensor_pair(img1, img2))[0].permute(1, 2, 0).numpy()
    got = load(os.fspath(out))(img1, img2)
    assert float(np.sqrt(((got - want) ** 2).sum(-1)).mean()) < 0.01
    from edgeflow.inspect import format_report, inspect_package

    report = inspect_package(os.fspath(out))  # a CPU package shows its cost and pruning too
    assert report["cost"] == manifest["cost"] and "channels" not in report["pruning"]
    assert "GMAC" in format_report(report) and "pruning    0.3 of the channels" in format_report(report)
    # bench's torch peer rebuilds the pruned layers from the manifest
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    rebuilt = model_from_package(manifest, tmp_path / "x")
    assert layer_channels(rebuilt) == layer_channels(model)


def test_pruned_ss_builds_for_the_jetson(pruned_ss, tmp_path, capsys):
    from edgeflow.compile import compile

    model, weights = pruned_ss
    out = compile("flownet2-ss", target="jetson", input_size=SIZE, weights=str(weights), out=tmp_path / "ss.tar")
    manifest = manifest_of(out)
    with tarfile.open(os.fspath(out)) as tar:
        cubin = tar.extractfile("lib/kernels.cubin").read()
    assert int.from_bytes(cubin[48:52], "little") & 0xFF == 87
    assert manifest["kernels"] and all(k["spill_stores"] == k["spill_loads"] == 0 for k in manifest["kernels"])
    assert manifest["accuracy"]["epe_vs_torch"] < 0.01
    assert manifest["cost"]["parameters"] == count_parameters(model) < 0.6 * count_parameters(create("flownet2-ss"))
    assert main(["inspect", os.fspath(out)]) == 0
    text = capsys.readouterr().out
    assert "M parameters" in text and "GMAC" in text and "pruning    0.3 of the channels (l1)" in text


def test_compile_prunes_on_calibration_frames(tmp_path, monkeypatch):
    import cv2

    from edgeflow.compile import compile
    from edgeflow.synth import video_frames

    frames = tmp_path / "frames"
    frames.mkdir()
    for i, (img, _) in enumerate(video_frames(np.random.default_rng(0), 3, (96, 160))):
        cv2.imwrite(str(frames / f"{i:03d}.png"), img)
    module = sys.modules["edgeflow.compile.prune"]  # compile() prunes with the defaults: make them small
    monkeypatch.setattr(module, "prune", functools.partial(module.prune, distill_steps=1, batch=1, size=SIZE,
                                                           validation_pairs=1))
    out = compile("flownet2-s", target="host", input_size=SIZE, prune=0.3, calibration=frames, out=tmp_path / "p.tar",
                  max_epe_increase=1e9)  # one distillation step: the EPE gate is not what is tested
    manifest = manifest_of(out)
    p = manifest["pruning"]
    assert p["ratio"] == 0.3 and p["distillation"]["data"].startswith(f"3 calibration frames from {str(frames)!r}")
    assert p["parameters"]["after"] == manifest["cost"]["parameters"] < p["parameters"]["before"]
    assert manifest["accuracy"]["epe_vs_torch"] < 0.01


def test_compile_refuses_bad_calibration_writing_nothing(tmp_path):
    from edgeflow.compile import compile

    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "x.tar"
    with pytest.raises(InputError, match=r"^calibration=.*0 frames found"):
        compile("flownet2-s", target="host", input_size=SIZE, prune=0.3, calibration=empty, out=out)
    with pytest.raises(InputError, match=r"^calibration: .*prune="):
        compile("flownet2-s", target="host", input_size=SIZE, calibration=empty, out=out)
    assert not out.exists()
