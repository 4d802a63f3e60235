"""Structured pruning: real channel removal (fewer parameters and MACs, checked against a second,
independent construction), distillation, pruned weight files, calibration frames, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeflow.cli import main
from edgeflow.compile.cost import count_macs, count_parameters
from edgeflow.compile.prune import FLOW_LAYERS, prune, save
from edgeflow.errors import InputError
from edgeflow.models import create
from edgeflow.models.channels import conv_layers, layer_channels

SIZE = (64, 128)
FAST = dict(size=SIZE, batch=1, validation_pairs=2)


def _pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(1, 3, *SIZE, generator=g)
    return a, torch.roll(a, (1, 3), (2, 3))


def _flow(model, pair):
    with torch.no_grad():
        return model(*pair)


# ------------------------------------------------------------------ the MAC counter


class _Two(nn.Module):
    """img1, img2 -> one convolution of their concatenation, then one deconvolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 24, 7, 2, 3)
        self.deconv = nn.ConvTranspose2d(24, 4, 4, 2, 1)

    def forward(self, a, b):
        return self.deconv(self.conv(torch.cat((a, b), 1)))


def test_mac_counter_against_hand_count():
    # conv: 24 outputs x 6 inputs x 7x7 taps at each of 32x64 output pixels;
    # deconv: each of the 32x64 input pixels scatters 24 x 4 x 4x4 products
    assert count_macs(_Two(), SIZE) == 24 * 6 * 49 * 32 * 64 + 32 * 64 * 24 * 4 * 16
    net = create("flownet2-s", weights=None)
    assert count_macs(net, (128, 256)) == 4 * count_macs(net, SIZE)  # convolutions scale with the pixels
    assert count_parameters(net) == sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------ pruning removes channels


def test_pruning_removes_channels_parameters_and_macs():
    model = create("flownet2-s", weights=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune(model, 0.3, distill_steps=0, **FAST)
    r = pruned.pruning
    assert r["parameters"]["before"] == count_parameters(model)
    assert r["parameters"]["after"] == count_parameters(pruned) < 0.6 * count_parameters(model)
    assert r["macs"]["after"] == count_macs(pruned, SIZE) < 0.6 * count_macs(model, SIZE)
    old, new = layer_channels(model), layer_channels(pruned)
    assert new["flownets.conv2.0"][1] < old["flownets.conv2.0"][1]
    assert new["flownets.deconv3.0"][1] < old["flownets.deconv3.0"][1]
    for name, (cin, cout) in new.items():  # flow heads keep 2 channels, the image input keeps 6
        if name.split(".")[1].startswith(FLOW_LAYERS):
            assert cout == 2
    assert new["flownets.conv1.0"][0] == 6
    assert _flow(pruned, _pair()).shape == (1, 2, *SIZE)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is left alone


def test_channel_counts_are_multiples_of_round_to():
    model = create("flownet2-s", weights=None)
    pruned = {r: layer_channels(prune(model, 0.3, round_to=r, distill_steps=0, **FAST)) for r in (8, 1)}
    old = layer_channels(model)
    changed = [n for n in old if pruned[8][n][1] != old[n][1]]
    assert changed and all(pruned[8][n][1] % 8 == 0 for n in changed)
    assert 30 <= pruned[1]["flownets.conv2.0"][1] <= 36 and pruned[1]["flownets.conv2.0"][1] % 8  # 48 less ~30 %
    with pytest.raises(InputError, match="^round_to=0"):
        prune(model, 0.3, round_to=0)


def _mark_channels(model) -> None:
    """Give every prunable layer distinct biases: they tell which output channels survive."""
    with torch.no_grad():
        for name, m in conv_layers(model).items():
            if not name.split(".")[1].startswith(FLOW_LAYERS):
                m.bias.copy_(torch.linspace(-0.05, 0.05, m.out_channels))


def _zero_removed(model, pruned):
    """`model` with the output channels that `pruned` lacks zeroed (weights and bias), found by
    matching the marked biases: a construction independent of Torch-Pruning's bookkeeping."""
    import copy

    zeroed = copy.deepcopy(model)
    layers, kept_layers = conv_layers(zeroed), conv_layers(pruned)
    removed = 0
    with torch.no_grad():
        for name, m in layers.items():
            kept = kept_layers[name]
            if kept.out_channels == m.out_channels:
                continue
            idx = [int(torch.nonzero(m.bias == b)[0]) for b in kept.bias]
            gone = sorted(set(range(m.out_channels)) - set(idx))
            assert len(idx) == len(set(idx)) == kept.out_channels
            # the survivors keep their own weights (inputs narrowed, order kept)
            w = m.weight[idx] if isinstance(m, nn.Conv2d) else m.weight[:, idx]
            assert (w.shape[1] if isinstance(m, nn.Conv2d) else w.shape[0]) >= kept.in_channels
            if isinstance(m, nn.Conv2d):
                m.weight[gone] = 0
            else:
                m.weight[:, gone] = 0
            m.bias[gone] = 0
            removed += len(gone)
    assert removed > 0
    return zeroed


@pytest.mark.parametrize("name", ["flownet2-s", "flownet2-ss", "flownet2-c"])
def test_pruned_net_equals_unpruned_net_with_channels_zeroed(name):
    torch.manual_seed(0)
    model = create(name, weights=None)
    _mark_channels(model)
    pruned = prune(model, 0.3, distill_steps=0, **FAST)
    zeroed = _zero_removed(model, pruned)
    pair = _pair()
    want, got, full = _flow(zeroed, pair), _flow(pruned, pair), _flow(model, pair)
    scale = float(full.abs().mean())
    assert float((got - want).abs().max()) < 1e-4 * max(scale, 1.0)
    assert float((full - want).abs().mean()) > 1e-3 * scale  # the removed channels did matter
    if name == "flownet2-c":  # the siamese tower and conv_redir feed the correlation: kept whole
        assert layer_channels(pruned)["flownetc.conv3.0"] == layer_channels(model)["flownetc.conv3.0"]


def test_taylor_importance_picks_other_channels():
    torch.manual_seed(0)
    model = create("flownet2-s")
    _mark_channels(model)
    l1 = prune(model, 0.3, distill_steps=0, **FAST)
    taylor = prune(model, 0.3, importance="taylor", distill_steps=0, **FAST)
    assert layer_channels(l1) == layer_channels(taylor)
    assert taylor.pruning["importance"] == "taylor"
    picks = [set(conv_layers(net)["flownets.conv4.0"].bias.tolist()) for net in (l1, taylor)]
    assert picks[0] != picks[1]


# ------------------------------------------------------------------ distillation


def test_distillation_brings_the_pruned_net_closer_to_the_teacher():
    pruned = prune(create("flownet2-s"), 0.3, distill_steps=16, batch=2, size=SIZE, lr=2e-4, validation_pairs=4)
    e = pruned.pruning["epe_vs_unpruned"]
    assert e["after_distillation"] < e["after_pruning"]
    d = pruned.pruning["distillation"]
    assert d["steps"] == 16 and "generated" in d["data"]


def test_distillation_on_natural_pairs_with_ground_truth_leaves_checkpoints(tmp_path):
    """Each checkpoint is a loadable weight file saying how far the distillation got."""
    steps = []

    def checkpoint(student):
        save(student, "flownet2-s", tmp_path / "ckpt.pt")
        steps.append(create("flownet2-s", weights=str(tmp_path / "ckpt.pt")).pruning["distillation"]["steps"])

    pruned = prune(create("flownet2-s"), 0.3, distill_steps=3, natural=0.5, truth=1.0, checkpoint=checkpoint,
                   checkpoint_s=0, **FAST)
    assert steps == [1, 2]  # the finished run is the caller's to save
    d = pruned.pruning["distillation"]
    assert d["steps"] == 3 and "ground truth" in d["loss"] and "50% natural" in d["data"]
    assert pruned.pruning["epe_vs_unpruned"]["after_distillation"] is not None


def test_a_cut_distillation_resumes_from_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "p.pt"
    args = ["prune", "--ratio", "0.3", "--size", "64x128", "--batch", "1", "--checkpoint-minutes", "0", "-o", str(out)]
    assert main([*args, "--steps", "2"]) == 0
    first = create("flownet2-s", weights=str(out))
    assert main([*args, "--steps", "4", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resume   the distillation of a pruned 0.3 checkpoint at step 2/4" in err
    assert "step 3/4" in err and "step 1/4" not in err.split("resume")[1]
    resumed = create("flownet2-s", weights=str(out))
    assert resumed.pruning["distillation"]["steps"] == 4
    assert layer_channels(resumed) == layer_channels(first)
    assert resumed.pruning["epe_vs_unpruned"]["after_pruning"] == first.pruning["epe_vs_unpruned"]["after_pruning"]
    with pytest.raises(InputError, match=r"^resume: the checkpoint has 4 distillation steps already, expected fewer"):
        prune(create("flownet2-s"), 0.3, distill_steps=4, resume=resumed, **FAST)
    with pytest.raises(InputError, match=r"^resume: expected a checkpoint pruned by 0.5 \(l1, round_to 8\), got one "
                                         r"pruned by 0.3 \(l1, round_to 8\)$"):
        prune(create("flownet2-s"), 0.5, distill_steps=8, resume=resumed, **FAST)


def test_ground_truth_needs_generated_pairs(tmp_path):
    with pytest.raises(InputError, match=r"^natural=0.0, truth=1.0: .*truth only on generated pairs"):
        prune(create("flownet2-s", weights=None), 0.3, calibration=tmp_path, truth=1.0)


# ------------------------------------------------------------------ weight files and the CLI


def test_pruned_weight_file_reloads_weights_only(tmp_path):
    pruned = prune(create("flownet2-s"), 0.3, distill_steps=2, **FAST)
    path = tmp_path / "pruned.pt"
    save(pruned, "flownet2-s", path)
    blob = torch.load(path, weights_only=True)
    assert blob["meta"]["channels"] == layer_channels(pruned)
    again = create("flownet2-s", weights=str(path))
    assert layer_channels(again) == layer_channels(pruned)
    assert again.pruning == pruned.pruning
    pair = _pair(1)
    assert torch.equal(_flow(again, pair), _flow(pruned, pair))
    with pytest.raises(InputError, match="flownet2-ss"):
        create("flownet2-ss", weights=str(path))


def test_bad_channel_counts_leave_the_model_alone(tmp_path):
    from edgeflow.models.weights import load_into

    pruned = prune(create("flownet2-s", weights=None), 0.3, distill_steps=0, **FAST)
    path = tmp_path / "bad.pt"
    save(pruned, "flownet2-s", path)
    blob = torch.load(path, weights_only=True)
    blob["meta"]["channels"]["flownets.conv2.0"][1] += 1  # counts that the tensors do not have
    torch.save(blob, path)
    model = create("flownet2-s", weights=None)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match="conv2"):
        load_into(model, "flownet2-s", path)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_cli_prune_writes_a_loadable_file(tmp_path, capsys):
    out = tmp_path / "new" / "p.pt"  # its folder is created
    assert main(["prune", "flownet2-s", "--ratio", "0.25", "--steps", "1", "--batch", "1", "--size", "64x128",
                 "-o", str(out)]) == 0
    assert "parameters 5.46 M ->" in capsys.readouterr().out
    assert create("flownet2-s", weights=str(out)).pruning["ratio"] == 0.25


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_bad_ratio(ratio):
    with pytest.raises(InputError, match=r"^ratio="):
        prune(create("flownet2-s", weights=None), ratio)


# ------------------------------------------------------------------ calibration frames


def _frames(d, count=3, size=(96, 160)):
    import cv2

    from edgeflow.synth import video_frames

    d.mkdir()
    for i, (img, _) in enumerate(video_frames(np.random.default_rng(0), count, size)):
        cv2.imwrite(str(d / f"f{i:03d}.png"), img)
    return d


def _bad_dirs(tmp_path):
    import cv2

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no frames here")
    broken = _frames(tmp_path / "broken")
    (broken / "f001.png").write_bytes(b"\x89PNG truncated")
    flat = _frames(tmp_path / "flat")
    cv2.imwrite(str(flat / "f002.png"), np.full((96, 160, 3), 40, np.uint8))
    one = tmp_path / "one"
    one.mkdir()
    cv2.imwrite(str(one / "a.png"), np.random.default_rng(0).integers(0, 255, (96, 160, 3), np.uint8))
    return [(empty, "0 frames found"), (broken, "f001.png is not a readable image"),
            (flat, "f002.png is all one colour"), (one, "1 frame found"), (tmp_path / "missing", "not a directory")]


def test_bad_calibration_directories_fail_in_one_line_writing_nothing(tmp_path, capsys):
    model = create("flownet2-s", weights=None)
    for d, what in _bad_dirs(tmp_path):
        with pytest.raises(InputError) as e:
            prune(model, 0.3, calibration=d, **FAST)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"calibration={str(d)!r}: {what}") and "expected" in msg
        out = tmp_path / "p.pt"
        assert main(["prune", "--ratio", "0.3", "--calib", str(d), "-o", str(out)]) == InputError.exit_code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and what in err
        assert not out.exists()


def test_distillation_on_calibration_frames(tmp_path):
    d = _frames(tmp_path / "frames", count=4)
    pruned = prune(create("flownet2-s"), 0.3, calibration=d, distill_steps=2, **FAST)
    assert pruned.pruning["distillation"]["data"].startswith(f"4 calibration frames from {str(d)!r}")
