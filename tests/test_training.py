"""Training: the multi-scale loss, the schedule, checkpoints and resume, frozen stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeflow.training import LOSS_WEIGHTS, PairStream, TrainConfig, multiscale_loss, train

TINY = dict(batch=2, curriculum=[[0, 64, 64]], scene=(64, 128), workers=0, eval_every=2, heldout_pairs=2, heldout_size=(64, 64))


def test_loss_is_zero_at_the_pooled_target_and_sums_pixels():
    flow = torch.randn(2, 2, 64, 64) * 5
    pooled = [torch.nn.functional.avg_pool2d(flow / 20, 2 ** k, 2 ** k) for k in range(2, 7)]
    assert float(multiscale_loss(pooled, flow)) == pytest.approx(0, abs=1e-6)
    # a constant error of (3, 4)/20 at every pixel of every level: EPE 0.25 per pixel, summed per pair
    off = [p + torch.tensor([3.0, 4.0]).view(1, 2, 1, 1) / 20 for p in pooled]
    want = sum(w * 0.25 * (64 // 2 ** k) ** 2 for w, k in zip(LOSS_WEIGHTS, range(2, 7)))
    assert float(multiscale_loss(off, flow)) == pytest.approx(want, rel=1e-5)


def test_weighted_loss_ignores_pixels_of_weight_zero_and_is_the_plain_loss_at_weight_one():
    flow = torch.randn(2, 2, 128, 128) * 5  # flow6 is 2x2: its columns pool one half each
    pooled = [torch.nn.functional.avg_pool2d(flow / 20, 2 ** k, 2 ** k) for k in range(2, 7)]
    ones = torch.ones(2, 1, 128, 128)
    off = [p + 0.3 for p in pooled]
    assert float(multiscale_loss(off, flow, ones)) == pytest.approx(float(multiscale_loss(off, flow)), rel=1e-5)
    wild = flow.clone()
    wild[..., 64:] = 1000  # labels of the right half are nonsense and weigh nothing
    weight = torch.cat([ones[..., :64], torch.zeros(2, 1, 128, 64)], -1)
    exact_left = [torch.cat([p[..., :p.shape[3] // 2], p[..., p.shape[3] // 2:] + 9], -1) for p in pooled]
    assert float(multiscale_loss(exact_left, wild, weight)) == pytest.approx(0, abs=1e-4)
    assert float(multiscale_loss(exact_left, wild)) > 100


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
    """The frozen first stage is the donor's to the bit; the second stage, which starts as a copy
    of the first (where shapes match), has moved away from that start: two steps were trained."""
    from edgeflow.models import create
    from edgeflow.models.weights import save

    torch.manual_seed(1)
    donor = create("flownet2-s", weights=None)
    save(donor, "flownet2-s", tmp_path / "s.pt")
    start = {k: v.half().float() for k, v in donor.state_dict().items()}
    train(TrainConfig(model="flownet2-ss", steps=2, init_from=str(tmp_path / "s.pt"), **TINY),
          tmp_path / "run", progress=False)
    trained = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]
    first = {k: v for k, v in trained.items() if k.startswith("flownets.")}
    assert first and all(torch.equal(v, start[k]) for k, v in first.items())

    def source(k):
        return k.replace("flownets_1.", "flownets.", 1)

    copied = [k for k in trained if k.startswith("flownets_1.")
              and trained[k].shape == start.get(source(k), torch.empty(0)).shape]
    assert len(copied) > 20
    moved = [k for k in copied if not torch.equal(trained[k], start[source(k)])]
    assert len(moved) > len(copied) // 2, f"only {len(moved)} of {len(copied)} second-stage tensors trained"


def test_pairs_are_aligned_crops_with_their_flow():
    """Each training item's flow carries img1 onto img2 after the crop, flips and channel order:
    img2 warped back with the flow (as the network's warp does) is closer to img1 than with the
    flow's sign flipped (what a flip augmentation that forgot to negate the flow would give)."""
    import multiprocessing as mp

    from edgeflow.models.ops import warp_reference

    scene = (128, 192)
    stream = iter(PairStream(3, mp.Array("i", (64, 96), lock=False), scene))
    aligned, flipped = [], []
    for _ in range(6):
        img1, img2, flow = next(stream)
        assert img1.shape == img2.shape == (3, 64, 96) and flow.shape == (2, 64, 96)
        assert 0 <= float(img1.min()) and float(img1.max()) <= 1
        back = warp_reference(img2[None], flow[None])[0]
        inside = _lands_inside(flow)
        aligned.append(float((back - img1).abs().mean(0)[inside].mean()))
        wrong = warp_reference(img2[None], -flow[None])[0]
        flipped.append(float((wrong - img1).abs().mean(0)[inside].mean()))
    assert np.mean(aligned) < 0.7 * np.mean(flipped), (aligned, flipped)


def _lands_inside(flow: torch.Tensor) -> torch.Tensor:
    h, w = flow.shape[1:]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    x, y = xs + flow[0], ys + flow[1]
    return (x >= 1) & (x <= w - 2) & (y >= 1) & (y <= h - 2)


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


def test_budget_stops_with_a_checkpoint_and_the_run_resumes(tmp_path):
    """A wall-clock budget ends the run between evaluations with a checkpoint of the step reached."""
    out = tmp_path / "run"
    config = TrainConfig(model="flownet2-s", steps=50, **{**TINY, "eval_every": 1000})
    last = train(config, out, progress=False, budget_s=0.01)
    assert last == {}  # stopped before any evaluation...
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 1  # ...after the first step, and saved it
    train(TrainConfig(model="flownet2-s", steps=3, **{**TINY, "eval_every": 1000}), out, progress=False)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3


def test_fine_tune_from_weights_on_a_natural_mix_in_bf16(tmp_path):
    """--init starts from the given weights; --natural logs the natural held-out set; bf16 trains."""
    from edgeflow.models import create
    from edgeflow.models.weights import save

    torch.manual_seed(3)
    start = create("flownet2-s", weights=None)
    save(start, "flownet2-s", tmp_path / "start.pt", half=False)
    out = tmp_path / "run"
    config = TrainConfig(model="flownet2-s", steps=1, lr=0.0, init=str(tmp_path / "start.pt"), natural=1.0,
                         bf16=True, **{**TINY, "eval_every": 1})
    row = train(config, out, progress=False)
    assert row["heldout_natural_epe"] > 0 and row["heldout_epe"] > 0
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    for k, w in start.state_dict().items():  # lr 0: still the starting weights
        torch.testing.assert_close(ck["model"][k], w)


def test_pair_stream_mixes_styles():
    import multiprocessing as mp

    size = mp.Array("i", [64, 64], lock=False)
    chairs = next(iter(PairStream(5, size, (64, 128), natural=0.0)))
    natural = next(iter(PairStream(5, size, (64, 128), natural=1.0)))
    assert chairs[0].shape == natural[0].shape == (3, 64, 64)
    assert not torch.equal(chairs[0], natural[0])


def test_cli_refuses_cuda_without_a_gpu(tmp_path, capsys):
    from edgeflow.cli import main
    from edgeflow.errors import InputError

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert main(["train", "flownet2-s", "--out", str(tmp_path / "run"), "--device", "cuda"]) == InputError.exit_code
    assert "--device cuda" in capsys.readouterr().err
    assert main(["train", "flownet2-s", "--out", str(tmp_path / "run"), "--budget-minutes", "0"]) == InputError.exit_code
    assert not (tmp_path / "run").exists()


def test_pair_stream_leaves_natural_ingredients_out():
    import multiprocessing as mp

    size = mp.Array("i", [64, 64], lock=False)
    streams = [iter(PairStream(5, size, (64, 128), natural=1.0, without=w)) for w in ((), ("atmosphere", "blur"))]
    pairs = [[next(s) for _ in range(4)] for s in streams]
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(*pairs))


@pytest.mark.parametrize("argv, expect", [
    (["--natural", "0.5", "--natural-without", "blur,fog"],
     "--natural-without blur,fog: natural-style ingredient 'fog'"),
    (["--natural-without", "blur"], "--natural is 0"),
])
def test_cli_checks_the_ingredients_it_leaves_out(argv, expect, tmp_path, capsys):
    from edgeflow.cli import main
    from edgeflow.errors import InputError

    assert main(["train", "flownet2-s", "--out", str(tmp_path / "run"), *argv]) == InputError.exit_code
    err = capsys.readouterr().err
    assert expect in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
