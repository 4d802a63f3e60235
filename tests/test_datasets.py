"""Layout detection and sample loading on tiny datasets written into tmp_path."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeflow import write_flow
from edgeflow.datasets import open_dataset
from edgeflow.errors import InputError

H, W = 12, 20  # asymmetric on purpose


def _img(path: Path, rng, gray: bool = False, size=(H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 256, size if gray else (*size, 3), dtype=np.uint8))


def _flow(path: Path, value=(1.5, -2.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flow = np.empty((H, W, 2), np.float32)
    flow[:] = value
    flow[0, 0] = np.nan if path.suffix == ".png" else 1e9  # one unknown vector
    write_flow(path, flow)


def _mask(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((H, W), np.uint8)
    mask[5, :] = 255
    cv2.imwrite(str(path), mask)


def _sizes(sets) -> dict[str, int]:
    return {name: len(ds) for name, ds in sets.items()}


def test_chairs(tmp_path, rng):
    for frame, ext in (("00001", "ppm"), ("00002", "png")):
        _img(tmp_path / f"{frame}_img1.{ext}", rng)
        _img(tmp_path / f"{frame}_img2.{ext}", rng)
        _flow(tmp_path / f"{frame}_flow.flo")
    sets = open_dataset(tmp_path)
    assert _sizes(sets) == {"chairs": 2}
    s = sets["chairs"][1]
    assert s.name == "00002" and s.img1.shape == (H, W, 3) and s.img1.dtype == np.uint8
    assert s.flow.shape == (H, W, 2) and s.flow.dtype == np.float32 and tuple(s.flow[3, 3]) == (1.5, -2.0)
    assert s.valid.dtype == bool and s.valid.sum() == H * W - 1 and not s.valid[0, 0]


def test_sintel(tmp_path, rng):
    t = tmp_path / "training"
    for kind in ("clean", "final"):
        for n in (1, 2, 3):
            _img(t / kind / "alley_1" / f"frame_{n:04d}.png", rng)
    for n in (1, 2):
        _flow(t / "flow" / "alley_1" / f"frame_{n:04d}.flo")
        _mask(t / "invalid" / "alley_1" / f"frame_{n:04d}.png")
    sets = open_dataset(tmp_path)
    assert _sizes(sets) == {"sintel-clean": 2, "sintel-final": 2}
    s = sets["sintel-final"][1]
    assert s.name == "alley_1/frame_0002"
    assert not s.valid[5].any() and s.valid.sum() == H * W - W - 1


def test_kitti(tmp_path, rng):
    t = tmp_path / "training"
    for frame in ("000000", "000001"):
        _img(t / "image_2" / f"{frame}_10.png", rng)
        _img(t / "image_2" / f"{frame}_11.png", rng)
        _flow(t / "flow_occ" / f"{frame}_10.png", value=(-3.25, 7.0))
    sets = open_dataset(tmp_path)
    assert _sizes(sets) == {"kitti": 2}
    s = sets["kitti"][0]
    assert s.name == "000000" and tuple(s.flow[1, 1]) == (-3.25, 7.0)
    assert not s.valid[0, 0] and s.valid.sum() == H * W - 1


def test_middlebury(tmp_path, rng):
    for seq in ("Venus", "Urban2"):
        _img(tmp_path / "other-data" / seq / "frame10.png", rng)
        _img(tmp_path / "other-data" / seq / "frame11.png", rng)
        _flow(tmp_path / "other-gt-flow" / seq / "flow10.flo")
    _img(tmp_path / "other-data" / "Beanbags" / "frame10.png", rng)  # no ground truth: skipped
    sets = open_dataset(tmp_path)
    assert _sizes(sets) == {"middlebury": 2}
    assert [s.name for s in sets["middlebury"]] == ["Urban2", "Venus"]


def test_realflow_layout(tmp_path, rng):
    for name in ("middlebury", "middlebury-color"):
        seq = tmp_path / name / "Venus"
        _img(seq / "frame10.png", rng, gray=name == "middlebury")
        _img(seq / "frame11.png", rng, gray=name == "middlebury")
        _flow(seq / "flow10.flo")
    for kind, scene in (("clean", "alley_1"), ("final", "alley_1"), ("final", "ambush_4")):
        d = tmp_path / "sintel" / kind / scene
        _img(d / "frame_0004.png", rng)
        _img(d / "frame_0005.png", rng)
        _flow(d / "frame_0004.flo")
        _mask(d / "invalid" / "frame_0004.png")
    k = tmp_path / "kitti2015" / "000010"
    _img(k / "image_2" / "000010_10.png", rng)
    _img(k / "image_2" / "000010_11.png", rng)
    _flow(k / "flow_occ" / "000010_10.png")
    sets = open_dataset(tmp_path)
    assert _sizes(sets) == {"middlebury": 1, "middlebury-color": 1, "sintel-clean": 1,
                            "sintel-final": 1, "sintel-final-hard": 1, "kitti": 1}
    gray = sets["middlebury"][0].img1
    assert gray.shape == (H, W, 3) and (gray[..., 0] == gray[..., 2]).all()  # gray as 3-channel BGR
    assert sets["sintel-final-hard"][0].name == "ambush_4/frame_0004"
    assert not sets["sintel-clean"][0].valid[5].any()


def test_real_realflow(realflow):
    sets = open_dataset(realflow)
    assert _sizes(sets) == {"middlebury": 8, "middlebury-color": 2, "sintel-clean": 4,
                            "sintel-final": 7, "sintel-final-hard": 2, "kitti": 1}
    s = sets["kitti"][0]
    assert s.img1.shape == (375, 1242, 3) and s.flow.shape == (375, 1242, 2)
    assert 0.1 < s.valid.mean() < 0.9 and np.isfinite(s.flow[s.valid]).all()
    venus = next(s for s in sets["middlebury"] if s.name == "Venus")
    assert venus.img1.shape == (380, 420, 3)


def test_unknown_layout(tmp_path, rng):
    _img(tmp_path / "holiday.png", rng)
    with pytest.raises(InputError, match="no optical-flow pairs found in .*known layouts: .*Sintel"):
        open_dataset(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        open_dataset(tmp_path / "absent")


def test_mismatched_sizes(tmp_path, rng):
    _img(tmp_path / "00001_img1.png", rng)
    _img(tmp_path / "00001_img2.png", rng, size=(H, W + 2))
    _flow(tmp_path / "00001_flow.flo")
    ds = open_dataset(tmp_path)["chairs"]
    with pytest.raises(InputError, match=r"00001_img1\.png is 20x12, .*00001_img2\.png is 22x12"):
        ds[0]


def test_flow_size_differs(tmp_path, rng):
    _img(tmp_path / "00001_img1.png", rng, size=(H + 1, W))
    _img(tmp_path / "00001_img2.png", rng, size=(H + 1, W))
    _flow(tmp_path / "00001_flow.flo")
    with pytest.raises(InputError, match=r"00001_flow\.flo is 20x12"):
        open_dataset(tmp_path)["chairs"][0]


def test_missing_second_frame(tmp_path, rng):
    _img(tmp_path / "00001_img1.png", rng)
    _flow(tmp_path / "00001_flow.flo")
    with pytest.raises(InputError, match=r"00001_img2\.png: file of the pair is missing"):
        open_dataset(tmp_path)
