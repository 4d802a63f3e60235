"""edgeflow weight files: round trip, and bad files refused whole with a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgeflow.errors import InputError
from edgeflow.models import create
from edgeflow.models import weights as wio


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(5)
    model = create("flownet2-s", weights=None)
    path = tmp_path / "s.pt"
    wio.save(model, "flownet2-s", path, meta={"step": 7})
    return model, path


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_round_trip_in_fp16(saved):
    model, path = saved
    loaded = create("flownet2-s", weights=None)
    assert wio.load_into(loaded, "flownet2-s", path) == {"step": 7}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.half().float())


def test_truncated_file_is_refused(saved, tmp_path):
    _, path = saved
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match=r"cut.pt: not a readable weight file"):
        create("flownet2-s", weights=cut)


class _Payload:
    """Unpickling this would call os.system: what a hostile 'weight file' carries."""

    def __reduce__(self):
        import os

        return os.system, ("touch /tmp/edgeflow-pwned",)


def test_file_with_code_is_refused_without_torchs_unsafe_advice(tmp_path, capsys):
    from edgeflow.cli import main

    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": "flownet2-s", "state_dict": {}, "meta": _Payload()}, evil)
    with pytest.raises(InputError, match="evil.pt: not a readable weight file .it holds Python objects") as info:
        create("flownet2-s", weights=evil)
    assert "weights_only" not in str(info.value) and "can still be loaded" not in str(info.value)
    assert main(["compile", "--target", "host", "--weights", str(evil), "--size", "64x128",
                 "-o", str(tmp_path / "x.tar")]) == InputError.exit_code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "weights_only" not in err and "False" not in err
    assert not Path("/tmp/edgeflow-pwned").exists() and not (tmp_path / "x.tar").exists()


def test_weights_of_another_model_are_refused(saved):
    _, path = saved
    with pytest.raises(InputError, match=r"s.pt: weights are for model 'flownet2-s', not 'flownet2-c'"):
        create("flownet2-c", weights=path)


def test_wrong_shape_names_the_first_bad_parameter_and_loads_nothing(saved, tmp_path):
    _, path = saved
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["flownets.conv5.0.weight"] = blob["state_dict"]["flownets.conv5.0.weight"][:5]
    blob["state_dict"]["flownets.conv4.0.weight"] = blob["state_dict"]["flownets.conv4.0.weight"][:5]
    bad = tmp_path / "bad.pt"
    torch.save(blob, bad)
    torch.manual_seed(6)
    model = create("flownet2-s", weights=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=r"bad.pt: parameter 'flownets.conv4.0.weight' has shape \(5, "):
        wio.load_into(model, "flownet2-s", bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shipped_weights_are_checked_against_their_sha256(saved, tmp_path, monkeypatch):
    model, path = saved
    monkeypatch.setattr(wio, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setattr(wio, "INDEX", tmp_path / "weights" / "index.json")
    dest = wio.ship_weights(path, "flownet2-s")
    assert wio.shipped()["flownet2-s"]["sha256"] == wio.sha256_file(path)
    assert _same(create("flownet2-s"), create("flownet2-s", weights=path))
    data = bytearray(dest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dest.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"flownet2-s.pt: sha256 does not match weights/index.json"):
        create("flownet2-s")
    with pytest.raises(InputError, match=r"no trained weights ship for 'flownet2-ss' \(shipped: flownet2-s\)"):
        create("flownet2-ss")


def test_named_checkpoints_ship_beside_the_default_weights(saved, tmp_path, monkeypatch, capsys):
    """A pruned net shipped as checkpoint "pruned-0.3" of flownet2-s: loaded by name, listed by
    `edgeflow models`, checked against its sha256, kept when the default weights are re-shipped."""
    from edgeflow.cli import main
    from edgeflow.compile.prune import prune, save

    _, path = saved
    monkeypatch.setattr(wio, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setattr(wio, "INDEX", tmp_path / "weights" / "index.json")
    pruned = prune(create("flownet2-s", weights=None), 0.3, distill_steps=0, size=(64, 64), validation_pairs=1)
    save(pruned, "flownet2-s", tmp_path / "pruned.pt")
    with pytest.raises(InputError, match=r"^checkpoint 'pruned-0.3': 'flownet2-s' has no default weights"):
        wio.ship_weights(tmp_path / "pruned.pt", "flownet2-s", "pruned-0.3")
    wio.ship_weights(path, "flownet2-s")
    dest = wio.ship_weights(tmp_path / "pruned.pt", "flownet2-s", "pruned-0.3")
    wio.ship_weights(path, "flownet2-s")
    loaded = create("flownet2-s", weights="pruned-0.3")
    assert loaded.pruning["ratio"] == 0.3 and _same(loaded, create("flownet2-s", weights=str(tmp_path / "pruned.pt")))
    assert main(["models"]) == 0 and "(weights also: pruned-0.3)" in capsys.readouterr().out
    with pytest.raises(InputError, match=r"^weight file 'pruned-0.5' does not exist \(shipped weights of "
                                         r"flownet2-s: default, pruned-0.3\)$"):
        create("flownet2-s", weights="pruned-0.5")
    data = bytearray(dest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dest.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"flownet2-s-pruned-0.3.pt: sha256 does not match"):
        create("flownet2-s", weights="pruned-0.3")


@pytest.mark.parametrize("name", ["flownet2-s", "flownet2-ss"])
def test_shipped_models_are_trained_fp16_weights(name):
    """flownet2-s and -ss ship (MODEL_CARD.md): at most 12 MB of fp16 per FlowNetS stage, and
    trained: on 8 held-out pairs the EPE is well below the zero-flow EPE, where an untrained net
    sits."""
    import numpy as np

    from edgeflow.models import spec
    from edgeflow.training import evaluate_pairs, heldout_set

    entry = wio.shipped()[name]
    path = wio.WEIGHTS_DIR / entry["file"]
    assert path.stat().st_size <= 12 * 2**20 * len(spec(name).stages)
    state = wio.read(path)["state_dict"]
    assert all(v.dtype == torch.float16 for v in state.values())
    pairs = heldout_set(8, (384, 512))
    zero = float(np.mean([np.linalg.norm(flow, axis=2).mean() for _, _, flow in pairs]))
    assert evaluate_pairs(create(name).eval(), pairs) < 0.7 * zero


def test_the_shipped_stack_keeps_the_shipped_first_stage():
    """flownet2-ss was trained on top of the shipped flownet2-s, frozen: its first stage is it."""
    s, ss = create("flownet2-s"), create("flownet2-ss")
    assert _same(getattr(ss, ss.names[0]), getattr(s, s.names[0]))
