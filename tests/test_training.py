"""Training: the multi-scale loss, the schedule, checkpoints and resume, frozen stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeflow.training import LOSS_WEIGHTS, TrainConfig, multiscale_loss, train

TINY = dict(batch=2, curriculum=[[0, 64, 64]], scene=(64, 128), workers=0, eval_every=2, heldout_pairs=2, heldout_size=(64, 64))


def test_loss_is_zero_at_the_pooled_target_and_sums_pixels():
    flow = torch.randn(2, 2, 64, 64) * 5
    pooled = [torch.nn.functional.avg_pool2d(flow / 20, 2 ** k, 2 ** k) for k in range(2, 7)]
    assert float(multiscale_loss(pooled, flow)) == pytest.approx(0, abs=1e-6)
    # a constant error of (3, 4)/20 at every pixel of every level: EPE 0.25 per pixel, summed per pair
    off = [p + torch.tensor([3.0, 4.0]).view(1, 2, 1, 1) / 20 for p in pooled]
    want = sum(w * 0.25 * (64 // 2 ** k) ** 2 for w, k in zip(LOSS_WEIGHTS, range(2, 7)))
    assert float(multiscale_loss(off, flow)) == pytest.approx(want, rel=1e-5)


def test_schedule():
    c = TrainConfig(steps=100, lr=1e-3, curriculum=[[0, 64, 64], [50, 128, 192]])
    assert [c.lr_at(s) for s in (0, 59, 60, 80, 95)] == [1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4]
    assert c.size_at(49) == (64, 64) and c.size_at(50) == (128, 192)


def test_crops_must_fit_in_the_scene():
    from edgeflow.errors import InputError

    with pytest.raises(InputError, match=r"training crop 320x448 \(curriculum, from step 50\) does not fit in the 256x512 scene"):
        TrainConfig(curriculum=[[0, 128, 128], [50, 320, 448]], scene=(256, 512))


def test_train_writes_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(model="flownet2-s", steps=2, **TINY), out, progress=False)
    assert (out / "ckpt.pt").exists() and (out / "best.pt").exists()
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 2
    last = train(TrainConfig(model="flownet2-s", steps=4, **TINY), out, progress=False)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and last["step"] == 4
    assert all(np.isfinite(r["heldout_epe"]) and r["heldout_epe"] > 0 for r in rows)
    from edgeflow.models import create

    create("flownet2-s", weights=out / "best.pt")  # best.pt is a loadable weight file


def test_weight_average_is_what_gets_evaluated_saved_and_resumed(tmp_path):
    from edgeflow.models import create
    from edgeflow.models.weights import read

    out = tmp_path / "run"
    config = dict(model="flownet2-s", ema=0.5, **{**TINY, "eval_every": 1})
    torch.manual_seed(0)
    init = create("flownet2-s", weights=None).state_dict()
    train(TrainConfig(steps=1, **config), out, progress=False)
    ck1 = torch.load(out / "ckpt.pt", weights_only=True)
    assert TrainConfig(ema=0.5).ema_at(0) == pytest.approx(0.1)
    for k, w in ck1["model"].items():  # after step 0: 0.1 x the initialisation + 0.9 x the weights
        torch.testing.assert_close(ck1["ema"][k], 0.1 * init[k] + 0.9 * w)
    best = read(out / "best.pt")
    assert best["meta"]["step"] == 1
    for k, w in best["state_dict"].items():
        torch.testing.assert_close(w, ck1["ema"][k].half())
    train(TrainConfig(steps=2, **config), out, progress=False)  # resumes the average too
    ck2 = torch.load(out / "ckpt.pt", weights_only=True)
    d = TrainConfig(ema=0.5).ema_at(1)
    assert d == pytest.approx(2 / 11)
    for k, w in ck2["model"].items():
        torch.testing.assert_close(ck2["ema"][k], d * ck1["ema"][k] + (1 - d) * w)


def test_stack_trains_only_its_last_stage(tmp_path):
    from edgeflow.models import create
    from edgeflow.models.weights import save

    torch.manual_seed(1)
    donor = create("flownet2-s", weights=None)
    save(donor, "flownet2-s", tmp_path / "s.pt")
    train(TrainConfig(model="flownet2-ss", steps=2, init_from=str(tmp_path / "s.pt"), **TINY),
          tmp_path / "run", progress=False)
    trained = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]
    first = {k: v for k, v in trained.items() if k.startswith("flownets.")}
    assert first and all(torch.equal(v, donor.state_dict()[k].half().float()) for k, v in first.items())
    torch.manual_seed(0)  # TrainConfig.seed: the run's own initialisation of the second stage
    init = create("flownet2-ss", weights=None).state_dict()
    second = [k for k in trained if k.startswith("flownets_1.")]
    assert second and any(not torch.equal(trained[k], init[k]) for k in second)


def test_pairs_are_crops_of_scene_size_renders():
    """Displacements scale with the render width, so a training crop is cut from a pair rendered
    at the scene size: item == augment(crop of generate_pair(rng, scene)) with the stream's rng."""
    import multiprocessing as mp

    from edgeflow.synth import generate_pair
    from edgeflow.training import PairStream, augment

    scene = (128, 192)
    item = next(iter(PairStream(3, mp.Array("i", (64, 96), lock=False), scene)))
    rng = np.random.default_rng([3, 0])
    img1, img2, flow = generate_pair(rng, scene)
    y, x = int(rng.integers(0, 128 - 64 + 1)), int(rng.integers(0, 192 - 96 + 1))
    want = augment(img1[y:y + 64, x:x + 96], img2[y:y + 64, x:x + 96], flow[y:y + 64, x:x + 96], rng)
    assert torch.equal(item[2], torch.from_numpy(np.ascontiguousarray(want[2].transpose(2, 0, 1))))
    assert torch.equal(item[0], torch.from_numpy(np.ascontiguousarray(want[0][:, :, ::-1].transpose(2, 0, 1))).float() / 255)


def test_heldout_set_is_what_synth_writes(tmp_path):
    from edgeflow.datasets import open_dataset
    from edgeflow.synth import write_chairs
    from edgeflow.training import heldout_set

    write_chairs(tmp_path, 2, size=(64, 96), seed=987654, progress=False)
    (pairs,) = open_dataset(tmp_path).values()
    assert len(pairs) == 2
    for (img1, img2, flow), pair in zip(heldout_set(2, (64, 96)), pairs):
        assert np.array_equal(img1, pair.img1) and np.array_equal(img2, pair.img2)
        assert np.array_equal(flow, pair.flow)


def test_a_stacked_stage_starts_as_a_copy_of_the_previous_one():
    from edgeflow.models import create
    from edgeflow.training import start_from_previous_stage

    torch.manual_seed(2)
    ss = create("flownet2-ss", weights=None)
    assert start_from_previous_stage(ss)
    s = create("flownet2-s", weights=None)
    s.flownets.load_state_dict(ss.flownets.state_dict())
    img1, img2 = torch.rand(2, 1, 3, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(ss(img1, img2), s(img1, img2))
    assert not start_from_previous_stage(create("flownet2-cs", weights=None))
