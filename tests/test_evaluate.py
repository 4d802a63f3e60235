"""evaluate() and `edgeflow eval` on a tiny synthetic FlyingChairs-layout directory."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeflow import write_flow
from edgeflow.errors import InputError
from edgeflow.evaluate import evaluate, model_flow

H, W = 96, 160
SHIFT = (3, -2)  # (u, v) in pixels


def _shifted_pair(rng) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random texture and the same texture moved by SHIFT: img2(x + SHIFT) = img1(x)."""
    texture = cv2.GaussianBlur(rng.uniform(0, 255, (H + 20, W + 20, 3)).astype(np.float32), (0, 0), 2)
    texture = cv2.normalize(texture, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    u, v = SHIFT
    return texture[10:10 + H, 10:10 + W], texture[10 - v:10 - v + H, 10 - u:10 - u + W]


@pytest.fixture
def chairs(tmp_path, rng) -> Path:
    for frame in ("00001", "00002"):
        img1, img2 = _shifted_pair(rng)
        cv2.imwrite(str(tmp_path / f"{frame}_img1.png"), img1)
        cv2.imwrite(str(tmp_path / f"{frame}_img2.png"), img2)
        write_flow(tmp_path / f"{frame}_flow.flo", np.broadcast_to(np.float32(SHIFT), (H, W, 2)))
    return tmp_path


def test_baseline_recovers_translation(chairs):
    result = evaluate("dis-medium", chairs, progress=False)
    assert set(result) == {"method", "epe", "sets"} and result["method"] == "dis-medium"
    assert set(result["sets"]) == {"chairs"}
    s = result["sets"]["chairs"]
    assert set(s) == {"epe", "pairs", "ms_per_pair"} and s["pairs"] == 2 and s["ms_per_pair"] > 0
    assert s["epe"] == result["epe"] < 0.3


def test_dis_fine_recovers_translation_at_least_as_well_as_dis_medium(chairs):
    fine, medium = (evaluate(m, chairs, progress=False)["epe"] for m in ("dis-fine", "dis-medium"))
    assert fine < 0.3 and fine <= medium * 1.05


def test_callable_and_kitti_fl_all(tmp_path, rng):
    img1, img2 = _shifted_pair(rng)
    k = tmp_path / "training"
    (k / "image_2").mkdir(parents=True)
    (k / "flow_occ").mkdir()
    cv2.imwrite(str(k / "image_2" / "000000_10.png"), img1)
    cv2.imwrite(str(k / "image_2" / "000000_11.png"), img2)
    write_flow(k / "flow_occ" / "000000_10.png", np.broadcast_to(np.float32(SHIFT), (H, W, 2)))

    def off_by_four(a, b):
        flow = np.empty((*a.shape[:2], 2), np.float32)
        flow[:] = SHIFT
        flow[: H // 4, :, 0] += 4  # a quarter of the pixels off by 4 px: Fl outliers
        return flow

    result = evaluate(off_by_four, tmp_path, progress=False)
    assert result["method"] == "off_by_four"
    assert result["sets"]["kitti"]["epe"] == pytest.approx(1.0)
    assert result["sets"]["kitti"]["fl_all"] == pytest.approx(0.25)


def test_wrong_flow_shape_is_reported(chairs):
    with pytest.raises(Exception, match=r"returned flow of shape \(2, 2\)"):
        evaluate(lambda a, b: np.zeros((2, 2)), chairs, progress=False)


def test_registry_model_runs_at_any_size(chairs):
    result = evaluate("flownet2-s", chairs, weights=None, progress=False)
    assert result["sets"]["chairs"]["pairs"] == 2 and np.isfinite(result["epe"])


def test_model_flow_resizes_and_scales():
    """A net that predicts u=1, v=1 px at 128x192 means u=W/192, v=H/128 px at HxW."""
    import torch

    class Constant(torch.nn.Module):
        def forward(self, a, b):
            assert a.shape == b.shape == (1, 3, 128, 192) and 0 <= a.min() and a.max() <= 1
            return torch.ones(1, 2, *a.shape[2:])

    flow = model_flow(Constant())(np.zeros((H, W, 3), np.uint8), np.zeros((H, W), np.uint8))
    assert flow.shape == (H, W, 2) and flow.dtype == np.float32
    np.testing.assert_allclose(flow[..., 0], W / 192, rtol=1e-6)
    np.testing.assert_allclose(flow[..., 1], H / 128, rtol=1e-6)


def test_unknown_method(chairs):
    with pytest.raises(InputError, match=r"unknown method 'raft'; choices: .*dis-medium.*flownet2-s"):
        evaluate("raft", chairs, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        evaluate(str(chairs / "model.tar"), chairs, progress=False)


def test_cli_json_and_table(chairs, capsys):
    from edgeflow.cli import main

    assert main(["eval", "dis-fast", "--data", str(chairs), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "dis-fast" and result["sets"]["chairs"]["pairs"] == 2

    assert main(["eval", "farneback", "--data", str(chairs)]) == 0
    out = capsys.readouterr().out
    assert "farneback" in out and "chairs" in out and "EPE" in out

    assert main(["eval", "nope", "--data", str(chairs)]) == InputError.exit_code
    assert capsys.readouterr().err.startswith("Error: unknown method 'nope'")
