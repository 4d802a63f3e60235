"""`edgeflow adapt`: its losses, a short run end to end (API and CLI), and the error contract."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from edgeflow.adapt import (AdaptConfig, _Pairs, _Replay, adapt, fuse, heldout_error, masked_mean, occlusion_mask,
                            photometric_distance, pseudo_labels, smoothness)
from edgeflow.errors import InputError

SIZE = (128, 160)


def chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].float()


def rgb(img: np.ndarray) -> torch.Tensor:
    from edgeflow.training import to_tensor_pair

    return to_tensor_pair(img, img)[0]


def texture(rng, h, w) -> np.ndarray:
    """A smooth random colour texture, uint8 HxWx3."""
    small = rng.uniform(0, 255, (h // 4, w // 4, 3)).astype(np.float32)
    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


def write_frames(directory: Path, count: int, seed: int = 3) -> Path:
    from edgeflow.synth import video_frames

    directory.mkdir(parents=True, exist_ok=True)
    for n, (img, _) in enumerate(video_frames(np.random.default_rng(seed), count, SIZE)):
        cv2.imwrite(str(directory / f"frame_{n:04d}.png"), img)
    return directory


def test_census_distance_is_the_soft_ternary_census_of_unflow(rng):
    """Against the definition, pixel by pixel in numpy: 7x7 neighbour differences d to the centre
    (0 outside the image), signatures d / sqrt(0.81 + d^2), s / (0.1 + s) of their squared
    differences averaged over the box."""
    from edgeflow.adapt import census_distance

    a, b = rng.uniform(0, 1, (2, 1, 3, 9, 11)).astype(np.float32)
    got = census_distance(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert got.shape == (1, 1, 9, 11)
    grey = [np.pad((0.299 * x[0, 0] + 0.587 * x[0, 1] + 0.114 * x[0, 2]) * 255, 3) for x in (a, b)]
    for y, x in [(0, 0), (4, 5), (8, 10), (2, 9)]:
        sig = [(g[y:y + 7, x:x + 7] - g[y + 3, x + 3]) / np.sqrt(0.81 + (g[y:y + 7, x:x + 7] - g[y + 3, x + 3]) ** 2)
               for g in grey]
        s = (sig[0] - sig[1]) ** 2
        assert got[0, 0, y, x] == pytest.approx(float((s / (0.1 + s)).mean()), rel=1e-5)


@pytest.mark.parametrize("loss", ["census", "ssim"])
def test_photometric_distance_vanishes_for_a_true_shift_and_not_for_zero_flow(loss, rng):
    img = texture(rng, 160, 192)
    a, b = img[10:138, 10:170], img[7:135, 15:175]  # b(x) = a(x - (5, -3)): flow (-5, 3) from a to b
    flow = np.broadcast_to(np.float32([-5, 3]), (*SIZE, 2))
    x1, x2 = rgb(a), rgb(b)
    true, inside = photometric_distance(x1, x2, chw(flow), loss)
    zero, _ = photometric_distance(x1, x2, torch.zeros(1, 2, *SIZE), loss)
    core = torch.zeros_like(inside)
    core[..., 8:-8, 8:-8] = 1  # away from the borders the census window and warp reach past
    assert float(masked_mean(true, inside * core)) < 1e-3
    assert float(masked_mean(zero, core)) > 0.02


@pytest.mark.parametrize("loss", ["census", "ssim"])
def test_photometric_distance_of_generated_pairs_is_lower_at_the_true_flow(loss):
    from edgeflow.synth import generate_pair

    true_sum = zero_sum = 0.0
    for seed in range(3):
        img1, img2, flow, aux = generate_pair(np.random.default_rng(seed), SIZE, photometric=False, aux=True)
        x1, x2 = rgb(img1), rgb(img2)
        visible = torch.from_numpy(~aux["occluded"])[None, None].float()
        true, inside = photometric_distance(x1, x2, chw(flow), loss)
        zero, _ = photometric_distance(x1, x2, torch.zeros(1, 2, *SIZE), loss)
        true_sum += float(masked_mean(true, visible * inside))
        zero_sum += float(masked_mean(zero, visible))
    assert true_sum < 0.5 * zero_sum


def test_occlusion_mask_flags_the_background_a_moving_square_covers(rng):
    h, w = SIZE
    bg, fg = texture(rng, h, w), texture(rng, h, w)
    shift = np.array([9, 6])  # (dx, dy) of the square
    y0, x0, side = 40, 50, 40
    img1, img2 = bg.copy(), bg.copy()
    img1[y0:y0 + side, x0:x0 + side] = fg[y0:y0 + side, x0:x0 + side]
    img2[y0 + 6:y0 + 6 + side, x0 + 9:x0 + 9 + side] = fg[y0:y0 + side, x0:x0 + side]
    square1 = np.zeros((h, w), bool)
    square1[y0:y0 + side, x0:x0 + side] = True
    square2 = np.zeros((h, w), bool)
    square2[y0 + 6:y0 + 6 + side, x0 + 9:x0 + 9 + side] = True
    fw = np.zeros((h, w, 2), np.float32)
    fw[square1] = shift
    bw = np.zeros((h, w, 2), np.float32)
    bw[square2] = -shift
    occluded = square2 & ~square1  # background of img1 that the square covers in img2
    mask = occlusion_mask(chw(fw), chw(bw))[0, 0].numpy()
    assert mask[occluded].mean() > 0.95
    assert mask[~occluded].mean() < 0.02
    # the square itself and the background it uncovers are visible in img2
    assert not mask[square1].any()


def test_smoothness_is_zero_for_an_affine_flow_and_not_for_a_noisy_one(rng):
    h, w = SIZE
    img = rgb(texture(rng, h, w))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    affine = np.dstack([0.03 * x - 0.02 * y + 4, 0.01 * x + 0.05 * y - 2])  # a pan with zoom and rotation
    noisy = affine + rng.normal(0, 1, affine.shape).astype(np.float32)
    assert float(smoothness(chw(affine), img)) < 1e-6
    assert float(smoothness(chw(noisy), img)) > 1e-3


def shifted_frames(rng, count: int, size=SIZE, step=(3, -2)) -> list:
    """`count` crops of one texture, the view moved by -`step` (dx, dy) px each time: the flow from
    frame t to t+1 is `step` everywhere."""
    h, w = size
    big = texture(rng, h + 64, w + 64)
    return [np.ascontiguousarray(big[32 - k * step[1]:32 - k * step[1] + h, 32 - k * step[0]:32 - k * step[0] + w])
            for k in range(count)]


def test_fuse_takes_each_region_from_the_candidate_that_explains_it(rng):
    a, b = shifted_frames(rng, 2)
    x1, x2 = rgb(a), rgb(b)
    true = torch.tensor([3.0, -2.0]).view(1, 2, 1, 1).expand(1, 2, *SIZE)
    wrong = torch.zeros(1, 2, *SIZE)
    left = torch.cat([true[..., :80], wrong[..., 80:]], -1)  # right in the left half only
    right = torch.cat([wrong[..., :80], true[..., 80:]], -1)
    fused = fuse(x1, x2, [left, right])
    for cols in (np.s_[12:64], np.s_[96:-12]):  # away from the borders and the seam
        torch.testing.assert_close(fused[..., 12:-12, cols], true[..., 12:-12, cols])


def test_pseudo_labels_of_a_pan_are_the_pan_and_follow_crops_flips_and_swaps(rng):
    from edgeflow.models import create

    frames = shifted_frames(rng, 4, (128, 192))  # the network's sizes are multiples of 64
    labels = pseudo_labels(create("flownet2-s").eval(), frames, (1, 2), "dis-medium,dis-fine", 4)
    assert set(labels) == {(0, 1), (1, 1), (2, 1), (0, 2), (1, 2)}
    flows = labels[(0, 2)]
    assert flows.shape == (2, 3, 32, 48) and flows.dtype == np.float32
    core = np.s_[:, :, 4:-4, 4:-4]
    want = np.float32([[6 / 4, -4 / 4], [-6 / 4, 4 / 4]])[:, :, None, None]  # gap 2, in px at stride 4
    assert np.abs(flows[:, :2] - want)[core].max() < 0.1
    checked = flows[:, 2]  # the share of each pixel that passed the forward-backward check
    assert checked.min() >= 0 and checked.max() <= 1 and checked[:, 4:-4, 4:-4].min() == 1
    assert checked[0, :, -1].max() < 1  # the pan leaves the image at the right (forward, dx = 6)
    pairs = _Pairs(frames, (64, 64), (1, 2), np.random.default_rng(0), 4, labels)
    for _ in range(8):  # whatever the crop, flips and order, the forward label maps img1 onto img2
        img1, img2, both = pairs.batch(2)
        assert both.shape == (4, 3, 16, 16)
        import torch.nn.functional as F

        small1, small2 = F.avg_pool2d(img1, 4), F.avg_pool2d(img2, 4)
        for x1, x2, f in ((small1, small2, both[:2, :2]), (small2, small1, both[2:, :2])):
            at_label, inside = photometric_distance(x1, x2, f)
            at_zero, _ = photometric_distance(x1, x2, torch.zeros_like(f))
            assert float(masked_mean(at_label, inside)) < 0.5 * float(at_zero.mean())


def test_adapt_writes_weights_that_load_and_reports_before_and_after(tmp_path):
    from edgeflow.models import create
    from edgeflow.models.weights import read

    frames = write_frames(tmp_path / "frames", 10)
    out = tmp_path / "adapted.pt"
    result = adapt("flownet2-s", frames, out, steps=3, batch=1, crop=(64, 128), lr=1e-4, progress=False)
    assert result.path == str(out) and out.is_file() and not list(tmp_path.glob("*.tmp"))
    assert (result.frames, result.train_frames, result.heldout_pairs, result.steps) == (10, 8, 1, 3)
    assert result.size == (128, 192)  # the frames' size rounded up to multiples of 64
    assert np.isfinite([result.photometric_before, result.photometric_after]).all()
    assert 0 < result.photometric_before < 1 and result.photometric_after != result.photometric_before
    blob = read(out)
    assert blob["model"] == "flownet2-s" and blob["meta"]["adapt"]["steps"] == 3
    assert all(v.dtype == torch.float32 for v in blob["state_dict"].values())
    adapted, shipped = create("flownet2-s", weights=out), create("flownet2-s")
    changed = [k for k, v in adapted.state_dict().items() if not torch.equal(v, shipped.state_dict()[k])]
    assert changed
    # the file holds exactly the network the "after" figure was measured on
    from edgeflow.adapt import read_footage

    footage, _ = read_footage(frames)
    assert heldout_error(adapted, footage[8:]) == pytest.approx(result.photometric_after, rel=1e-5)
    assert heldout_error(shipped, footage[8:]) == pytest.approx(result.photometric_before, rel=1e-5)


def test_adapt_stops_at_its_time_budget(tmp_path):
    frames = write_frames(tmp_path / "frames", 6)
    result = adapt("flownet2-s", frames, tmp_path / "a.pt", steps=100000, seconds=2, batch=1, crop=(64, 64),
                   progress=False)
    assert 1 <= result.steps < 100000 and (tmp_path / "a.pt").is_file()


def test_cli_adapts_a_stack_on_a_video_uri(tmp_path, capsys):
    from edgeflow.cli import main
    from edgeflow.models import create
    from edgeflow.synth import write_video

    clip = write_video(tmp_path / "clip", 8, size=SIZE, progress=False) / "clip.mp4"
    out = tmp_path / "ss.pt"
    code = main(["adapt", "flownet2-ss", "--frames", f"file://{clip}", "-o", str(out), "--steps", "2",
                 "--batch", "1", "--crop", "64x128", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["model"] == "flownet2-ss" and report["frames"] == 8 and report["steps"] == 2
    adapted, shipped = create("flownet2-ss", weights=out), create("flownet2-ss")
    first = adapted.names[0] + "."  # a stack trains its last stage only, as training does
    assert all(torch.equal(v, shipped.state_dict()[k]) for k, v in adapted.state_dict().items() if k.startswith(first))
    assert any(not torch.equal(v, shipped.state_dict()[k]) for k, v in adapted.state_dict().items()
               if not k.startswith(first))


def _cli_error(argv, capsys) -> tuple[int, str]:
    from edgeflow.cli import main

    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


@pytest.mark.parametrize("case", ["empty", "unreadable", "too-few", "missing", "model", "sizes", "out-dir"])
def test_bad_input_is_one_line_exit_3_and_writes_nothing(case, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    model, expect = "flownet2-s", ""
    if case == "empty":
        expect = "holds no images"
    elif case == "unreadable":
        write_frames(frames, 8)
        (frames / "frame_0003.png").write_bytes(b"not a png")
        expect = "frame_0003.png: not a readable image"
    elif case == "too-few":
        write_frames(frames, 3)
        expect = "3 frames read; adapt needs at least 6"
    elif case == "missing":
        frames = tmp_path / "nowhere"
        expect = "no such file or directory"
    elif case == "model":
        write_frames(frames, 8)
        model, expect = "flownet3", "unknown model 'flownet3'"
    elif case == "sizes":
        write_frames(frames, 8)
        cv2.imwrite(str(frames / "frame_0005.png"), np.zeros((64, 64, 3), np.uint8))
        expect = "frame 5 is 64x64, the first is 160x128"
    out = tmp_path / ("missing-dir/a.pt" if case == "out-dir" else "a.pt")
    if case == "out-dir":
        write_frames(frames, 8)
        expect = "does not exist"
    code, err = _cli_error(["adapt", model, "--frames", str(frames), "-o", str(out), "--steps", "1"], capsys)
    assert code == InputError.exit_code == 3
    assert err.startswith("Error: ") and err.count("\n") == 1 and expect in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]  # no weight file, no temporary


def test_bad_knobs_are_input_errors_naming_the_parameter(tmp_path):
    frames = write_frames(tmp_path / "frames", 6)
    for knobs, name in [({"steps": 0}, "steps="), ({"crop": (100, 128)}, "crop="), ({"loss": "l2"}, "loss="),
                        ({"holdout": 1.0}, "holdout="), ({"replay": -1}, "replay="), ({"warmup": 3}, "warmup="),
                        ({"proposals": "dis-medium,raft"}, "proposals="), ({"proposals": "dis-fine,dis-fine"},
                                                                          "proposals="),
                        ({"label_window": 16}, "label_window="), ({"label_unsure": 2.0}, "label_unsure=")]:
        with pytest.raises(InputError, match=name):
            adapt("flownet2-s", frames, tmp_path / "a.pt", progress=False, **knobs)
    assert not (tmp_path / "a.pt").exists()
    AdaptConfig().check()


def test_replay_pairs_carry_their_exact_flow():
    """The generated pairs that hold the net: crops of the requested size whose flow warps the
    second image onto the first (census distance well below zero or reversed flow's; the pairs
    carry brightness changes, blur and noise), the same for the same seed."""
    img1, img2, flow = _Replay((64, 128), seed=0).batch(3)
    assert img1.shape == img2.shape == (3, 3, 64, 128) and flow.shape == (3, 2, 64, 128)
    assert float(flow.abs().mean()) > 0.5  # the pairs move
    exact, inside = photometric_distance(img1, img2, flow)
    for wrong in (torch.zeros_like(flow), -flow):
        dist, _ = photometric_distance(img1, img2, wrong)
        assert float(masked_mean(exact, inside)) < 0.8 * float(masked_mean(dist, inside))
    again = _Replay((64, 128), seed=0).batch(3)
    assert all(torch.equal(a, b) for a, b in zip(again, (img1, img2, flow)))
    assert _Replay((448, 640), seed=1).batch(1)[0].shape[2:] == (384, 512)  # cut to the render size


def test_learning_rate_halves_at_60_80_90_percent_of_the_steps_or_of_the_time_budget():
    c = AdaptConfig(steps=100, lr=1e-4)
    assert [c.lr_at(s, 0.0) for s in (0, 59, 60, 80, 99)] == [1e-4, 1e-4, 5e-5, 2.5e-5, 1.25e-5]
    timed = AdaptConfig(steps=100, seconds=10.0, lr=1e-4)  # whichever of the two ends the run first
    assert timed.lr_at(10, 6.0) == 5e-5 and timed.lr_at(85, 1.0) == 2.5e-5
    assert AdaptConfig(steps=100, lr=1e-4, lr_decay=False).lr_at(99, 0.0) == 1e-4


def test_bench_adapt_scores_a_run_against_the_clips_ground_truth(tmp_path):
    """bench/adapt.py end to end on a tiny clip: the report's figures are consistent with each
    other and with the clip's exact flow (DIS-medium beats zero flow on it)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "adapted.pt"
    p = subprocess.run([sys.executable, str(root / "bench" / "adapt.py"), "--frames", "8", "--size", "128x192",
                        "--steps", "2", "--batch", "1", "--replay", "1", "--proposals", "dis-medium",
                        "--no-realflow", "--json", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout)
    assert report["clip"]["frames"] == 8 and report["clip"]["mean_speed_px"] > 0.5
    assert report["adapt"]["train_frames"] == 6 and report["adapt"]["steps"] == 2 and out.is_file()
    e = report["heldout_epe"]
    assert e["pairs"] == 1 and e["change"] == pytest.approx(e["after"] / e["before"] - 1)
    assert e["before"] != e["after"] and "realflow" not in report
    assert e["dis_medium"] < 0.8 * e["zero_flow"]  # the frames move as the ground truth says
    assert report["trained_frames_epe"]["before"] > 0
