"""Flow files (.flo, KITTI .png, .npy) and the Middlebury colour wheel."""

from __future__ import annotations

import numpy as np
import pytest

from edgeflow import flow_to_color, read_flow, write_flow
from edgeflow.errors import InputError
from edgeflow.flow_io import read_flow_valid


@pytest.fixture
def flow(rng) -> np.ndarray:
    """Asymmetric (H=5, W=7) flow whose u and v differ everywhere, with distinctive values."""
    f = rng.uniform(-200, 200, (5, 7, 2)).astype(np.float32)
    f[0, 0] = (1.5, -2.25)
    f[4, 6] = (-511.0, 511.984375)
    return f


@pytest.mark.parametrize("suffix", [".flo", ".npy"])
def test_exact_round_trip(tmp_path, flow, suffix):
    path = tmp_path / f"f{suffix}"
    write_flow(path, flow)
    back = read_flow(path)
    assert back.dtype == np.float32 and back.shape == (5, 7, 2)
    np.testing.assert_array_equal(back, flow)


def test_flo_layout(tmp_path):
    """Header magic, width then height, then u,v interleaved row-major, little-endian."""
    flow = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    write_flow(tmp_path / "f.flo", flow)
    data = (tmp_path / "f.flo").read_bytes()
    assert np.frombuffer(data[:4], "<f4")[0] == 202021.25
    assert tuple(np.frombuffer(data[4:12], "<i4")) == (3, 2)
    np.testing.assert_array_equal(np.frombuffer(data[12:], "<f4"), np.arange(12))


def test_kitti_round_trip(tmp_path, flow):
    flow[1, 2] = np.nan
    flow[3, 4] = (1e9, 0)
    path = tmp_path / "f.png"
    write_flow(path, flow)
    back, valid = read_flow_valid(path)
    expected_valid = np.ones((5, 7), bool)
    expected_valid[1, 2] = expected_valid[3, 4] = False
    np.testing.assert_array_equal(valid, expected_valid)
    assert np.isnan(back[~valid]).all()
    assert np.abs(back[valid] - flow[valid]).max() <= 1 / 128 + 1e-6  # rounded to 1/64 px


def test_kitti_channel_order(tmp_path):
    """R = u*64 + 2^15, G = v*64 + 2^15, B = valid (OpenCV stores B,G,R)."""
    import cv2

    write_flow(tmp_path / "f.png", np.array([[[2.0, -1.0]]], np.float32))
    b, g, r = cv2.imread(str(tmp_path / "f.png"), cv2.IMREAD_UNCHANGED)[0, 0]
    assert (r, g, b) == (2**15 + 128, 2**15 - 64, 1)


def test_flo_valid_mask(tmp_path, flow):
    flow[2, 3] = (1e10, 0)
    flow[0, 1] = (0, np.nan)
    write_flow(tmp_path / "f.flo", flow)
    _, valid = read_flow_valid(tmp_path / "f.flo")
    assert valid.sum() == 33 and not valid[2, 3] and not valid[0, 1]


def test_atomic_write_leaves_no_temp_file(tmp_path, flow):
    write_flow(tmp_path / "f.flo", flow)
    write_flow(tmp_path / "f.flo", flow[:2])
    assert [p.name for p in tmp_path.iterdir()] == ["f.flo"]
    assert read_flow(tmp_path / "f.flo").shape == (2, 7, 2)


def _flo(w: int, h: int, values: int, magic: float = 202021.25) -> bytes:
    return (np.array([magic], "<f4").tobytes() + np.array([w, h], "<i4").tobytes()
            + np.zeros(values, "<f4").tobytes())


@pytest.mark.parametrize("data, message", [
    (_flo(3, 2, 12, magic=1.0), "magic"),
    (_flo(3, 2, 11), "truncated"),
    (_flo(3, 2, 13), "should be 60 bytes"),
    (b"PIEH", "truncated .flo header"),
    (_flo(-3, 2, 0), "absurd"),
    (_flo(100000, 100000, 0), "absurd"),
])
def test_corrupt_flo(tmp_path, data, message):
    path = tmp_path / "bad.flo"
    path.write_bytes(data)
    with pytest.raises(InputError, match=message) as e:
        read_flow(path)
    assert "bad.flo" in str(e.value)


def test_bad_inputs(tmp_path, flow):
    with pytest.raises(InputError, match=r"suffix '\.jpg'.*\.flo, \.png, \.npy"):
        write_flow(tmp_path / "f.jpg", flow)
    with pytest.raises(InputError, match="HxWx2"):
        write_flow(tmp_path / "f.flo", flow[..., :1])
    with pytest.raises(InputError, match="does not exist"):
        read_flow(tmp_path / "missing.flo")
    with pytest.raises(InputError, match="does not exist"):
        write_flow(tmp_path / "no" / "f.flo", flow)
    np.save(tmp_path / "f.npy", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(InputError, match="HxWx2"):
        read_flow(tmp_path / "f.npy")
    import cv2

    cv2.imwrite(str(tmp_path / "img.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="16-bit 3-channel"):
        read_flow(tmp_path / "img.png")


def _rgb_at(u: float, v: float) -> tuple[int, int, int]:
    """RGB colour of vector (u, v) at full saturation, normalised by max_flow = its length."""
    bgr = flow_to_color(np.array([[[u, v]]], np.float32), max_flow=float(np.hypot(u, v)))
    return tuple(int(c) for c in bgr[0, 0, ::-1])


def test_colour_wheel_directions():
    r, g, b = _rgb_at(1, 0)  # right: red
    assert r == 255 and g == 0 and b <= 43
    assert _rgb_at(-1, 0) == (0, 209, 255)  # left: cyan-blue, wheel entry 27
    r, g, b = _rgb_at(0, 1)  # down: between entries 13 and 14 (orange-yellow)
    assert (r, b) == (255, 0) and 221 <= g <= 238
    r, g, b = _rgb_at(0, -1)  # up: between entries 40 and 41 (blue-violet)
    assert g == 0 and b == 255 and 78 <= r <= 98


def test_colour_magnitude_and_unknown():
    flow = np.array([[[0, 0], [2, 0], [4, 0], [np.nan, 0], [1e9, 0]]], np.float32)
    rgb = flow_to_color(flow)[0, :, ::-1].astype(int)
    assert tuple(rgb[0]) == (255, 255, 255)  # zero flow: white
    assert rgb[1, 0] == 255 and 120 <= rgb[1, 1] <= 135  # half the max radius: half saturated
    assert tuple(rgb[2]) == (255, 0, 0)
    assert tuple(rgb[3]) == tuple(rgb[4]) == (0, 0, 0)
    beyond = flow_to_color(np.array([[[8, 0]]], np.float32), max_flow=4)[0, 0, ::-1]
    assert tuple(beyond) == (191, 0, 0)  # beyond max_flow: darkened to 3/4


def test_colour_shape_and_dtype(flow):
    img = flow_to_color(flow)
    assert img.shape == (5, 7, 3) and img.dtype == np.uint8
    assert (img == 255).all(axis=-1).sum() == 0  # no vector is zero, so nothing is white
