"""The command line: the error contract (one line, documented exit codes, --debug) and the
commands that have no home elsewhere (models, targets, train, make demo's module)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeflow.errors import EXIT_INTERNAL, EXIT_USAGE, EdgeflowError, InputError

ROOT = Path(__file__).resolve().parents[1]


def run_main(argv, capsys):
    from edgeflow.cli import main

    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unexpected_exception_is_one_line_with_the_internal_code(capsys, monkeypatch):
    import edgeflow.models.weights

    def broken():
        raise ZeroDivisionError("the shipped index\nis broken")

    monkeypatch.setattr(edgeflow.models.weights, "shipped", broken)
    code, out, err = run_main(["models"], capsys)
    assert code == EXIT_INTERNAL == 1 and out == ""
    assert err == ("Error: internal error (ZeroDivisionError: the shipped index is broken); "
                   "run with --debug for the traceback and report it\n")
    code, _, err = run_main(["--debug", "models"], capsys)
    assert code == EXIT_INTERNAL and "Traceback (most recent call last)" in err and "def broken" not in err
    assert err.rstrip().splitlines()[-1].startswith("Error: internal error (ZeroDivisionError")
    monkeypatch.setenv("EDGEFLOW_DEBUG", "1")
    assert "Traceback" in run_main(["models"], capsys)[2]


def test_usage_and_input_errors_have_their_own_codes(capsys):
    code, _, err = run_main(["compile", "--no-such-flag"], capsys)
    assert code == EXIT_USAGE and err.startswith("Error: ") and len(err.strip().splitlines()) == 1
    code, _, err = run_main(["compile", "flownet2-x"], capsys)
    assert code == InputError.exit_code and err.startswith("Error: unknown model 'flownet2-x'")
    codes = {c.exit_code for c in EdgeflowError.__subclasses__()}
    assert len(codes) == 5 and EXIT_USAGE not in codes  # internal, input, package, accuracy, dependency


def test_models_command_against_the_weight_files(capsys):
    import torch

    from edgeflow.models import names
    from edgeflow.models.weights import WEIGHTS_DIR

    code, out, _ = run_main(["models", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and list(rows) == names()
    for name in ("flownet2-s", "flownet2-ss"):  # the shipped files hold exactly the counted parameters
        blob = torch.load(WEIGHTS_DIR / f"{name}.pt", weights_only=True)
        assert rows[name]["weights"] == "edgeflow"
        assert rows[name]["params"] == sum(v.numel() for v in blob["state_dict"].values())
    assert rows["flownet2-S"]["params"] > 30e6 > 6e6 > rows["flownet2-s"]["params"] > 5e6  # 3/8 width ~ (3/8)^2
    code, out, _ = run_main(["models"], capsys)
    assert out.splitlines()[0].split() == ["name", "width", "params", "weights", "description"]


def test_targets_command_lists_the_table(capsys):
    table = json.loads((ROOT / "targets" / "boards.json").read_text())
    boards = [k for k in table if not k.startswith("_")]
    code, out, _ = run_main(["targets", "--json"], capsys)
    rows = json.loads(out)
    assert code == 0 and [r["name"] for r in rows] == boards
    orin = next(r for r in rows if r["name"] == "jetson-orin-nano")
    assert orin["cuda_arch"] == "sm_87" and "jetson" in orin["aliases"] and orin["sm_count"] == 8
    code, out, _ = run_main(["targets"], capsys)
    assert any(line.startswith("jetson-orin-nano") and "sm_87" in line and "12.6" in line for line in out.splitlines())


def test_cuda_releases_come_from_the_table():
    """The Makefile installs the toolchains the boards table names, nothing else."""
    from edgeflow import targets

    releases = targets.cuda_releases()
    needed = {b.cuda_version for b in targets.BOARDS.values() if b.cuda_version} - {"10.2"}  # not on PyPI
    assert needed == set(releases)
    made = subprocess.run(["make", "-n", "-s", *(f"cuda-{r}" for r in releases)], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    for release, pins in releases.items():
        assert f"--target .venv/cuda/{release} {' '.join(pins)}" in made


@pytest.mark.parametrize("text, expected", [
    ("0:256x320", [[0, 256, 320]]),
    ("0:256x320,20000:320x448", [[0, 256, 320], [20000, 320, 448]]),
    ("0:64X128", [[0, 64, 128]]),
])
def test_parse_curriculum(text, expected):
    from edgeflow.cli.train import parse_curriculum

    assert parse_curriculum(text) == expected


@pytest.mark.parametrize("text", ["", "256x320", "0:256x320,", "5:256x320", "0:250x320", "0:0x64", "0:256x320,10:a"])
def test_parse_curriculum_refuses(text):
    from edgeflow.cli.train import parse_curriculum

    with pytest.raises(InputError, match="--curriculum"):
        parse_curriculum(text)


@pytest.mark.slow
def test_train_command(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_main(["train", "flownet2-s", "--out", str(run), "--steps", "2", "--batch", "1",
                               "--curriculum", "0:64x64", "--scene", "64x128", "--workers", "0",
                               "--eval-every", "2"], capsys)
    assert code == 0, err
    last = json.loads(out.strip().splitlines()[-1])
    assert last["step"] == 2 and last["heldout_epe"] > 0
    assert (run / "ckpt.pt").is_file() and (run / "best.pt").is_file()
    code, _, err = run_main(["train", "flownet2-s", "--out", str(run), "--curriculum", "0:64x64",
                             "--scene", "32x32"], capsys)
    assert code == InputError.exit_code and "does not fit" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.tvm
def test_make_demo_module(tmp_path):
    """`python -m edgeflow.demo OUT` (what `make demo` runs): its EPE is the shipped torch model's
    own on the same clip, measured here independently of the package."""
    import cv2
    import numpy as np

    from edgeflow import epe, read_flow
    from edgeflow.demo import FRAMES, SIZE
    from edgeflow.evaluate import model_flow
    from edgeflow.models import create

    env = {"EDGEFLOW_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "edgeflow.demo", str(tmp_path / "out")], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pairs"] == FRAMES - 1 and summary["weights"] == "default"
    assert {Path(p).name for p in summary["packages"].values()} == {"flownet2-s-jetson.tar", "flownet2-s-host.tar"}
    assert len(list((tmp_path / "out" / "flow").glob("flow_*.png"))) == FRAMES - 1
    clip = tmp_path / "out" / "clip"
    frames = sorted((clip / "frames").glob("frame_*.png"))
    flow_fn = model_flow(create("flownet2-s"), SIZE)
    errs = [epe(flow_fn(cv2.imread(str(a)), cv2.imread(str(b))), read_flow(clip / "flow" / f"{a.stem}.flo"))
            for a, b in zip(frames, frames[1:])]
    assert summary["epe"]["edgeflow-host"] == pytest.approx(float(np.mean(errs)), abs=0.01)
