"""Shared test helpers: paths to the shared evaluation data, small seeded inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REALFLOW = ROOT.parent / "shared" / "realflow"
REFERENCE = ROOT.parent / "shared" / "reference" / "flownet2-caffe"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def realflow() -> Path:
    if not REALFLOW.is_dir():
        pytest.skip("../shared/realflow is absent")
    return REALFLOW


def count_video_frames(path) -> int:
    """How many frames OpenCV decodes from the video at `path`."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    return count


# Largest EPE (px) of a compiled package against its torch model, per precision: the tests' own
# table, so that a change of the compiler's gate cannot loosen the tests with it.
TOLERANCE = {"fp32": 0.01, "fp16": 0.25, "int8": 0.15}  # int8: against the fake-quant model


def engine_epe_vs_torch(engine, model, size: tuple[int, int], pairs: int = 2, seed: int = 4242) -> float:
    """Mean EPE (px) between `engine` (a loaded package, or any `(img1, img2) -> HxWx2` callable)
    and the torch `model` run at `size` on generated pairs of that size."""
    from edgeflow import epe
    from edgeflow.evaluate import model_flow
    from edgeflow.synth import generate_pair

    rng = np.random.default_rng(seed)
    torch_fn = model_flow(model.eval(), size)
    errs = []
    for _ in range(pairs):
        img1, img2, _ = generate_pair(rng, size)
        errs.append(epe(engine(img1, img2), torch_fn(img1, img2)))
    return float(np.mean(errs))


@pytest.fixture(scope="session")
def host_package(tmp_path_factory) -> Path:
    """A small host package (flownet2-s, seeded random weights, 64x128, fp32) compiled once per
    session, for the streaming and daemon tests; packages extract into a per-session cache."""
    import os

    import torch

    from edgeflow.compile import compile
    from edgeflow.models import create

    os.environ.setdefault("EDGEFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.manual_seed(7)
    model = create("flownet2-s", weights=None)
    out = tmp_path_factory.mktemp("host-pkg") / "flownet2-s-host-64x128.tar"
    return compile(model, target="host", input_size=(64, 128), precision="fp32", out=out).path
