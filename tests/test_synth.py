"""The synthetic generator: determinism, exact flow, variety, the chairs/video layouts, the CLI."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgeflow import synth
from edgeflow.errors import InputError


def _warp_back(img2: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """img2 sampled bilinearly at (x + u, y + v): img1 wherever the flow is right."""
    h, w = flow.shape[:2]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return cv2.remap(img2.astype(np.float32), x + flow[..., 0], y + flow[..., 1], cv2.INTER_LINEAR)


def _interior(ids: np.ndarray) -> np.ndarray:
    """Pixels whose 5x5 neighbourhood lies in one layer (away from antialiased edges)."""
    k = np.ones((5, 5), np.uint8)
    return cv2.erode(ids, k) == cv2.dilate(ids, k)


def _read_flo(path) -> np.ndarray:
    data = path.read_bytes()
    assert np.frombuffer(data[:4], "<f4")[0] == 202021.25
    w, h = np.frombuffer(data[4:12], "<i4")
    return np.frombuffer(data[12:], "<f4").reshape(h, w, 2)


def test_same_seed_same_bytes():
    a = synth.generate_pair(np.random.default_rng(7), (64, 80))
    b = synth.generate_pair(np.random.default_rng(7), (64, 80))
    c = synth.generate_pair(np.random.default_rng(8), (64, 80))
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    assert a[0].tobytes() != c[0].tobytes()


@pytest.mark.parametrize("size", [(64, 80), (50, 70)])
def test_shapes_and_dtypes(size):
    img1, img2, flow = synth.generate_pair(np.random.default_rng(0), size)
    assert img1.shape == img2.shape == (*size, 3) and img1.dtype == img2.dtype == np.uint8
    assert flow.shape == (*size, 2) and flow.dtype == np.float32 and np.isfinite(flow).all()


def test_flow_is_exact():
    """Unoccluded interior pixels of img1 reappear in img2 at (x+u, y+v)."""
    errs, zero_errs = [], []
    for seed in range(4):
        img1, img2, flow, aux = synth.generate_pair(np.random.default_rng(seed), (128, 160),
                                                    photometric=False, aux=True)
        h, w = flow.shape[:2]
        y, x = np.mgrid[0:h, 0:w]
        tx, ty = x + flow[..., 0], y + flow[..., 1]
        inside = (tx > 1) & (tx < w - 2) & (ty > 1) & (ty < h - 2)
        tgt = _interior(aux["layers2"])[np.clip(np.rint(ty), 0, h - 1).astype(int),
                                        np.clip(np.rint(tx), 0, w - 1).astype(int)]
        ok = inside & ~aux["occluded"] & _interior(aux["layers1"]) & tgt
        assert ok.mean() > 0.4
        errs.append(np.abs(_warp_back(img2, flow) - img1)[ok].mean())
        zero_errs.append(np.abs(_warp_back(img2, 0 * flow) - img1)[ok].mean())
    assert max(errs) < 3.0, errs
    assert np.mean(zero_errs) > 4 * np.mean(errs)  # the check above can tell a wrong flow


def test_photometric_changes_only_appearance():
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    raw = synth.generate_pair(rng_a, (64, 80), photometric=False)
    aug = synth.generate_pair(rng_b, (64, 80))
    assert np.array_equal(raw[2], aug[2])
    assert not np.array_equal(raw[1], aug[1])


def test_variety_of_motion_and_layers():
    mags, layers = [], []
    for seed in range(8):
        _, _, flow, aux = synth.generate_pair(np.random.default_rng(seed), (96, 128), photometric=False, aux=True)
        mags.append(np.hypot(flow[..., 0], flow[..., 1]))
        layers.append(len(np.unique(aux["layers1"])))
    mags = np.concatenate([m.ravel() for m in mags])
    assert (mags < 2).mean() > 0.1  # sub-2-pixel motion is common...
    assert (mags > 128 / 20).mean() > 0.03 and mags.max() > 128 / 10  # ...and so is large motion
    assert max(layers) >= 5 and min(layers) >= 2


def test_write_chairs_layout(tmp_path):
    out = synth.write_chairs(tmp_path / "chairs", 3, size=(64, 80), seed=5, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:05d}_{k}" for i in (1, 2, 3) for k in ("flow.flo", "img1.png", "img2.png")]
    img1, img2, flow = synth.generate_pair(np.random.default_rng([5, 2]), (64, 80))
    assert np.array_equal(cv2.imread(str(out / "00002_img1.png")), img1)
    assert np.array_equal(cv2.imread(str(out / "00002_img2.png")), img2)
    assert np.array_equal(_read_flo(out / "00002_flow.flo"), flow)


def test_video_clip_and_ground_truth(tmp_path):
    out = synth.write_video(tmp_path / "clip", 6, size=(64, 96), seed=1, fps=25, progress=False)
    cap = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert frames == 6 and cap.get(cv2.CAP_PROP_FPS) == 25
    assert len(list((out / "frames").glob("frame_*.png"))) == 6
    assert sorted(p.name for p in (out / "flow").iterdir()) == [f"frame_{n:04d}.flo" for n in range(5)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert _read_flo(out / "flow" / "frame_0000.flo").shape == (64, 96, 2)


def test_video_flow_is_exact_and_smooth():
    clip = list(synth.video_frames(np.random.default_rng(2), 4, (96, 128), photometric=False))
    assert clip[-1][1] is None
    for (img, flow), (nxt, _) in zip(clip, clip[1:]):
        err = np.abs(_warp_back(nxt, flow) - img)
        h, w = flow.shape[:2]
        y, x = np.mgrid[0:h, 0:w]
        inside = (x + flow[..., 0] > 1) & (x + flow[..., 0] < w - 2) & (y + flow[..., 1] > 1) & (y + flow[..., 1] < h - 2)
        assert np.median(err[inside]) < 1.0


def test_cli_synth(tmp_path, capsys):
    from edgeflow.cli import main

    assert main(["synth", str(tmp_path / "c"), "--count", "2", "--size", "64x80", "--seed", "3"]) == 0
    assert (tmp_path / "c" / "00002_flow.flo").is_file()
    assert _read_flo(tmp_path / "c" / "00001_flow.flo").shape == (64, 80, 2)
    assert main(["synth", str(tmp_path / "v"), "--count", "3", "--size", "64x64", "--video"]) == 0
    assert (tmp_path / "v" / "clip.mp4").is_file()
    capsys.readouterr()
    assert main(["synth", str(tmp_path / "bad"), "--count", "2", "--size", "64by80"]) == InputError.exit_code
    err = capsys.readouterr().err
    assert "--size" in err and "HxW" in err and "384x512" in err
    assert main(["synth", str(tmp_path / "bad"), "--count", "0"]) == InputError.exit_code
    assert "--count" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "bad"), "--count", "2", "--size", "65x96", "--video"]) == InputError.exit_code
    assert "even" in capsys.readouterr().err
