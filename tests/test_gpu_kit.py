"""The GPU kit (bench/gpu_check.py prepare): our kernels' CUDA C, launch geometry and arguments,
standalone-compilable for the lent GPU's arch (sm_90) with ptxas and without spills."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.nvcc
def test_kit_kernels_compile_for_sm90_with_their_launch(tmp_path, monkeypatch):
    from edgeflow.compile.cuda_toolchain import compile_cuda

    gpu_check = _gpu_check()
    monkeypatch.setattr(gpu_check, "CASES", [("corr", "correlation", (1, 96, 8, 16), "float16"),
                                             ("warp", "warp", (1, 3, 32, 48), "float32")])
    gpu_check.prepare(tmp_path)
    kit = json.loads((tmp_path / "kit.json").read_text())
    corr, warp = kit["cases"]
    assert sorted(corr["args"]) == ["f1", "f2", "out"] and corr["output"] == "out"
    assert sorted(warp["args"]) == ["flow", "image", "warp"] and warp["output"] == "warp"
    # every output pixel of the warp is one thread (an image of 32 x 48, blocks of at most 1024)
    assert warp["grid"][0] * warp["block"][0] >= 32 * 48 and warp["block"][0] <= 1024
    assert corr["block"][0] <= 1024 and corr["block"][1:] == [1, 1]
    for case in kit["cases"]:
        _, resources = compile_cuda((tmp_path / case["source"]).read_text(), "sm_90", "12.6")
        assert [r.name for r in resources] == [case["kernel"]]
        assert resources[0].spill_stores == 0
