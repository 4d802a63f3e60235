"""The natural synthetic style: exact flow through bending layers, determinism, what it contains."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgeflow import synth, synth_natural
from edgeflow.errors import InputError

from test_synth import _interior, _warp_back


def _bending_scene(rng, h, w):
    """A flat grey background and one photo-textured layer that bends between the frames."""
    bg = synth._Layer(np.full((2 * h, 2 * w, 3), 128, np.uint8), np.array([w, h], float), np.eye(2),
                      np.array([w / 2, h / 2, 0.0, 0.0]))
    sh, sw = 60, 80
    photo = synth_natural.photo_bank()[0]  # the astronaut: detail everywhere
    sprite = np.dstack([photo[100:100 + sh, 150:150 + sw], np.full((sh, sw), 255, np.uint8)])
    sprite[:2, :, 3] = sprite[-2:, :, 3] = 0
    sprite[:, :2, 3] = sprite[:, -2:, 3] = 0
    deform = synth_natural._deformation(rng, sh, sw) * 3  # strong, but below the slope bound
    layer = synth._Layer(sprite, np.array([sw / 2, sh / 2]), np.eye(2), np.array([w / 2, h / 2, 0.1, 0.0]), deform)
    return [bg, layer]


def _rigid_flow(layer, next_pose, h, w):
    """The flow the layer would have without bending."""
    return cv2.transform(synth._grid(h, w), synth._flow_matrix(layer.matrix(layer.pose), layer.matrix(next_pose)))


def test_bending_layer_flow_is_exact():
    """img2 sampled at p + flow(p) is img1 inside a bending layer; the affine flow alone is not."""
    h, w = 96, 128
    rng = np.random.default_rng(4)
    layers = _bending_scene(rng, h, w)
    assert 2 < np.abs(layers[1].deform).max() < 0.07 * 3 * 60 + 1
    poses1 = [layers[0].pose, layers[1].pose + [3.0, -2.0, 0.05, 0.02]]
    img1, ids1, flow = synth._render(layers, [la.pose for la in layers], h, w, poses1)
    img2, ids2, _ = synth._render(layers, poses1, h, w, deformed=True)
    rigid = _rigid_flow(layers[1], poses1[1], h, w)
    inside = _interior(ids1) & (ids1 == 1)
    y, x = np.mgrid[0:h, 0:w]
    tx, ty = x + flow[..., 0], y + flow[..., 1]
    inside &= (tx > 1) & (tx < w - 2) & (ty > 1) & (ty < h - 2)
    inside &= _interior(ids2)[np.clip(np.rint(ty), 0, h - 1).astype(int), np.clip(np.rint(tx), 0, w - 1).astype(int)]
    assert inside.mean() > 0.2
    err = np.abs(_warp_back(img2, flow) - img1)[inside].mean()
    err_rigid = np.abs(_warp_back(img2, rigid) - img1)[inside].mean()
    assert np.abs(flow - rigid)[inside].max() > 2  # the layer really bends
    assert err < 4.0 and err_rigid > 2 * err, (err, err_rigid)


def test_natural_pairs_are_exact_and_deterministic():
    errs, zero = [], []
    for seed in range(5):
        a = synth.generate_pair(np.random.default_rng(seed), (96, 128), photometric=False, aux=True, style="natural")
        b = synth.generate_pair(np.random.default_rng(seed), (96, 128), photometric=False, aux=True, style="natural")
        assert all(np.array_equal(u, v) for u, v in zip(a[:3], b[:3]))
        img1, img2, flow, aux = a
        assert img1.dtype == np.uint8 and flow.shape == (96, 128, 2) and np.isfinite(flow).all()
        ok = ~aux["occluded"] & _interior(aux["layers1"])
        errs.append(np.abs(_warp_back(img2, flow) - img1)[ok].mean())
        zero.append(np.abs(_warp_back(img2, 0 * flow) - img1)[ok].mean())
    assert max(errs) < 3.0, errs
    assert np.mean(zero) > 2 * np.mean(errs)


def test_natural_style_differs_and_has_small_motions():
    chairs = synth.generate_pair(np.random.default_rng(1), (64, 80))
    natural = synth.generate_pair(np.random.default_rng(1), (64, 80), style="natural")
    assert not np.array_equal(chairs[0], natural[0])
    medians = [np.median(np.hypot(*synth.generate_pair(np.random.default_rng(s), (96, 128),
                                                       style="natural")[2].transpose(2, 0, 1)))
               for s in range(16)]
    assert min(medians) < 1.0 and max(medians) > 3.0, medians  # a small-motion regime and large motions


def test_unknown_style(tmp_path, capsys):
    from edgeflow.cli import main

    with pytest.raises(InputError, match="natural"):
        synth.generate_pair(np.random.default_rng(0), (64, 80), style="nature")
    assert main(["synth", str(tmp_path / "n"), "--count", "2", "--size", "64x80", "--style", "natural"]) == 0
    assert (tmp_path / "n" / "00002_flow.flo").is_file()
    assert main(["synth", str(tmp_path / "bad"), "--count", "2", "--style", "nature"]) == InputError.exit_code
    assert "--style" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("ingredient", synth_natural.INGREDIENTS)
def test_each_ingredient_can_be_left_out_and_the_flow_stays_exact(ingredient):
    """Leaving one ingredient out changes some pairs (the switch is wired) and never breaks the flow."""
    changed = 0
    for seed in range(12):
        full = synth.generate_pair(np.random.default_rng(seed), (64, 80), style="natural")
        part = synth.generate_pair(np.random.default_rng(seed), (64, 80), style="natural", without=[ingredient])
        changed += any(not np.array_equal(u, v) for u, v in zip(full, part))
    assert changed >= 2, f"leaving out {ingredient} changed {changed} of 12 pairs"
    img1, img2, flow, aux = synth.generate_pair(np.random.default_rng(3), (96, 128), photometric=False, aux=True,
                                                style="natural", without=[ingredient])
    ok = ~aux["occluded"] & _interior(aux["layers1"])
    assert np.abs(_warp_back(img2, flow) - img1)[ok].mean() < 3.0


def test_leaving_out_an_unknown_ingredient_or_one_of_the_chairs_style_is_an_input_error():
    with pytest.raises(InputError, match=r"ingredient 'fog': expected some of photos, .*sensor"):
        synth.generate_pair(np.random.default_rng(0), (64, 80), style="natural", without=["fog"])
    with pytest.raises(InputError, match="only the natural style"):
        synth.generate_pair(np.random.default_rng(0), (64, 80), without=["blur"])
