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
