"""int8: `quantize` (calibration, sensitivity, the fake-quant model), the int8 kernels against the
fake-quant ops layer by layer, the int8 package end to end, the compression gate and the CLI."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
import torch

from edgeflow.cli import main
from edgeflow.errors import InputError
from edgeflow.models import create

pytestmark = pytest.mark.tvm
SIZE = (64, 128)
FAST = {"size": SIZE, "calibration_pairs": 2, "validation_pairs": 2, "sensitivity_pairs": 1}


def manifest_of(path):
    with tarfile.open(os.fspath(path)) as tar:
        return json.load(tar.extractfile("manifest.json"))


@pytest.fixture(scope="module")
def qmodel():
    """flownet2-s (shipped weights) quantized on a few generated pairs."""
    from edgeflow.compile import quantize

    return quantize(create("flownet2-s"), None, **FAST)


def test_quantize_keeps_the_sensitive_layers_and_quantizes_per_channel(qmodel):
    from edgeflow.compile.quantize_torch import QuantConv

    q = qmodel.quantization
    assert set(q["kept_float"]) >= {"flownets.conv1", "flownets.predict_flow2", "flownets.upsampled_flow3_to_2"}
    assert {"flownets.conv3_1", "flownets.deconv2"} <= set(q["layers"]) | set(q["kept_float"])
    assert set(q["sensitivity"]) == set(q["layers"]) | {k for k, v in q["kept_float"].items() if "sensitivity" in v}
    assert q["epe"]["increase"] <= 0.05 and q["calibration"]["method"] == "percentile"
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantConv)}
    assert len(layers) == len(q["layers"]) > 0
    for m in layers.values():
        w = m.weight
        assert w.dtype == torch.int8 and int(w.abs().max()) == 127  # per channel: each reaches 127
        per_out = w.transpose(0, 1) if m.deconv else w
        assert (per_out.abs().flatten(1).amax(1) == 127).all()
        assert 0 <= m.zero_point <= 255 and m.a_scale > 0
    # the fake-quant model stays close to the float one on pairs like its calibration's (uniform
    # noise is not: its activations leave the calibrated ranges), and is not the float one
    from edgeflow.synth import generate_pair
    from edgeflow.training import to_tensor_pair

    epes = []
    for seed in range(3):
        pair = to_tensor_pair(*generate_pair(np.random.default_rng([seed, 17]), SIZE)[:2])
        with torch.no_grad():
            epes.append(float(torch.norm(qmodel(*pair) - create("flownet2-s")(*pair), dim=1).mean()))
    assert 0 < np.mean(epes) < 1


def test_quantize_argument_errors_are_one_line():
    from edgeflow.compile import quantize

    model = create("flownet2-s", weights=None)
    with pytest.raises(InputError, match=r"^method='kl': expected one of percentile, minmax$"):
        quantize(model, method="kl")
    with pytest.raises(InputError, match=r"^keep: no quantizable layer named nope;"):
        quantize(model, keep=["nope"], **FAST)
    with pytest.raises(InputError, match=r"^calibration='/nonexistent': not a directory"):
        quantize(model, "/nonexistent", **FAST)


def test_each_int8_kernel_computes_its_fake_quant_layer(qmodel):
    """Every int8 layer of the net, compiled alone with its hand schedule, against the torch op on
    the input the layer really sees: the same integers, so only float rounding differs. Also a
    layer whose channels are not multiples of the 4 x 16 blocks."""
    import tvm
    from tvm import relax

    from edgeflow import targets
    from edgeflow.compile import cpu_schedules, quantize_ops
    from edgeflow.compile.ops import apply_hand_schedules
    from edgeflow.compile.quantize_torch import QuantConv

    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, (mod, i[0], o)))
             for n, m in qmodel.named_modules() if isinstance(m, QuantConv)]
    with torch.no_grad():
        qmodel(torch.rand(1, 3, *SIZE), torch.rand(1, 3, *SIZE))
    for h in hooks:
        h.remove()
    odd = QuantConv(torch.nn.ConvTranspose2d(10, 20, 4, 2, 1), -1.0, 2.0, 0.1)
    seen["odd"] = (odd, torch.randn(1, 10, 4, 6), odd(torch.randn(1, 10, 4, 6)))
    seen["odd"] = (odd, seen["odd"][1], odd(seen["odd"][1]))
    target = targets.get("host").tvm_target()
    for name, (mod, x, y) in seen.items():
        bb = relax.BlockBuilder()
        args = [relax.Var(v, relax.TensorType(list(t.shape), str(t.dtype).replace("torch.", "")))
                for v, t in (("x", x), ("w", mod.weight), ("s", mod.w_scale), ("b", mod.bias))]
        with bb.function("main", args):
            bb.emit_func_output(quantize_ops.emit_qconv(
                bb, *args, a_scale=mod.a_scale, zero_point=mod.zero_point, stride=mod.stride, padding=mod.padding,
                slope=mod.slope, deconv=mod.deconv))
        with target:
            irmod = cpu_schedules.schedule(apply_hand_schedules(relax.get_pipeline("zero")(bb.get()), target))
        vm = relax.VirtualMachine(tvm.compile(irmod, target=target), tvm.cpu())
        got = vm["main"](*[tvm.runtime.tensor(t.detach().numpy()) for t in (x, mod.weight, mod.w_scale, mod.bias)])
        want = y.detach().numpy()
        assert np.abs(got.numpy() - want).max() <= 1e-5 * np.abs(want).max(), name


def test_vnni_instructions_where_the_cpu_has_them():
    import tvm

    from edgeflow import targets
    from edgeflow.compile.quantize_ops import has_vnni

    assert has_vnni(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
    assert not has_vnni(tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}))
    assert not has_vnni(targets.get("aarch64-cpu").tvm_target())


@pytest.fixture(scope="module")
def int8_package(tmp_path_factory):
    from edgeflow.compile import compile

    os.environ.setdefault("EDGEFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("int8") / "s-int8.tar"
    return compile("flownet2-s", target="host", input_size=SIZE, precision="int8", out=out, quantization=FAST)


def test_int8_package_matches_its_fake_quant_model(int8_package):
    from conftest import TOLERANCE, engine_epe_vs_torch

    from edgeflow.compile import quantize
    from edgeflow.compile.quantize_ops import has_vnni
    from edgeflow.runtime import load
    from edgeflow import targets

    m = int8_package.manifest
    assert m["precision"] == "int8" and m["quantization"]["layers"]
    assert m["accuracy"]["epe_vs_torch"] <= TOLERANCE["int8"]
    v = m["accuracy"]["validation"]
    assert v["increase"] <= 0.05 and v["pairs"] == 4 and v["before"] > 0
    assert m["cost"]["parameters"] == m["cost"]["before"]["parameters"]  # int8 removes no parameter
    kernels = m["quantization"]["kernels"]
    assert len(kernels) == len(m["quantization"]["layers"])
    if has_vnni(targets.get("host").tvm_target()):
        assert all(k["instructions"].get("vpdpbusd", 0) > 0 for k in kernels)
    # the package, loaded by the runtime, against the same fake-quant model rebuilt from the same inputs
    engine = load(os.fspath(int8_package.path))
    ref = quantize(create("flownet2-s"), None, **FAST)
    assert engine_epe_vs_torch(engine, ref, SIZE) <= TOLERANCE["int8"]


def test_inspect_marks_the_int8_kernels(int8_package, capsys):
    assert main(["inspect", os.fspath(int8_package.path)]) == 0
    text = capsys.readouterr().out
    assert "  int8       " in text and "kept float: flownets.conv1" in text and "validation EPE" in text


def test_compile_refuses_a_compressed_net_over_the_epe_limit(tmp_path, monkeypatch, capsys):
    """Ranges that clip nearly everything, and the sensitivity pass told the growth is fine: the
    compile gate measures the package against ground truth and refuses it (exit 5, nothing
    written); --force writes it."""
    import importlib

    from edgeflow.compile import quantize_torch

    qmod = importlib.import_module("edgeflow.compile.quantize")  # the module (the package exports the function)

    monkeypatch.setattr(qmod, "_increase", lambda new, old: 0.0)
    monkeypatch.setattr(quantize_torch, "activation_params", lambda lo, hi: (1e-4, 0))
    monkeypatch.setattr("edgeflow.compile.TOLERANCE", {"int8": 1e9})
    out = tmp_path / "bad.tar"
    argv = ["compile", "flownet2-s", "--target", "host", "--size", "64x128", "--precision", "int8", "-o", str(out)]
    import edgeflow.compile as ec

    real = ec.compile
    monkeypatch.setattr(ec, "compile", lambda *a, **k: real(*a, **k, quantization=FAST))
    assert main(argv) == 5
    err = capsys.readouterr().err  # progress lines, then the one error line
    assert err.count("Error:") == 1 and err.splitlines()[-1].startswith("Error: compressed flownet2-s has EPE")
    assert "max_epe_increase" in err
    assert not out.exists()
    assert main(argv + ["--force"]) == 0 and out.exists()


def test_int8_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "x.tar"
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["compile", "flownet2-s", "--size", "64x128", "--precision", "int8", "-o", str(out)]
    assert main(base + ["--target", "host", "--calib", str(empty)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"Error: calibration={str(empty)!r}: 0 frames found")
    assert main(base + ["--target", "jetson-nano"]) == 3  # sm_53: no dp4a
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no int8 dot product (dp4a needs sm_61" in err
    assert main(base + ["--target", "host", "--max-epe-increase", "-1"]) == 3
    assert "max_epe_increase=-1.0" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("board", ["jetson", "jetson-agx-xavier"])
def test_int8_for_the_jetsons_runs_on_dp4a_without_spills(board, tmp_path, capsys):
    """Every int8 layer is one kernel whose SASS has dp4a (IDP.4A), on sm_87 and on sm_72."""
    from edgeflow.compile import compile
    from edgeflow.compile.sass import cuobjdump
    from edgeflow.targets import get

    out = compile("flownet2-s", target=board, input_size=SIZE, precision="int8", out=tmp_path / "j.tar",
                  quantization=FAST)
    m = out.manifest
    assert m["kernels"] and all(k["spill_stores"] == k["spill_loads"] == 0 for k in m["kernels"])
    assert m["accuracy"]["epe_vs_torch"] <= 0.15 and m["accuracy"]["validation"]["increase"] <= 0.05
    if cuobjdump(get(board).cuda_arch) is None:
        pytest.skip("cuobjdump is not installed for this arch (make sass-tools)")
    conv = [k for k in m["kernels"] if k["name"].startswith(("qconv2d", "qdeconv2d"))]
    dp4a = [k for k in conv if k["sass"]["dp4a"] > 0]
    assert len(dp4a) == len(m["quantization"]["layers"])  # one dp4a kernel per int8 layer
    assert main(["inspect", os.fspath(out.path)]) == 0
    assert " dp4a " in capsys.readouterr().out


@pytest.mark.parametrize("deconv", [False, True])
def test_int8_kernels_without_vnni_compute_the_same(deconv):
    """The fallback schedule (x86 without VNNI, aarch64): same loops, vectorised, same integers."""
    import tvm
    from tvm import relax

    from edgeflow.compile import quantize_ops
    from edgeflow.compile.ops import apply_hand_schedules
    from edgeflow.compile.quantize_torch import QuantConv

    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose2d(20, 24, 4, 2, 1) if deconv else torch.nn.Conv2d(20, 24, 3, 2, 1)
    mod = QuantConv(layer, -1.0, 3.0, 0.1)
    x = torch.randn(1, 20, 8, 12)
    want = mod(x).detach().numpy()
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})  # AVX2, no VNNI: runs here too
    assert not quantize_ops.has_vnni(target)
    bb = relax.BlockBuilder()
    args = [relax.Var(v, relax.TensorType(list(t.shape), str(t.dtype).replace("torch.", "")))
            for v, t in (("x", x), ("w", mod.weight), ("s", mod.w_scale), ("b", mod.bias))]
    with bb.function("main", args):
        bb.emit_func_output(quantize_ops.emit_qconv(bb, *args, a_scale=mod.a_scale, zero_point=mod.zero_point,
                                                    stride=mod.stride, padding=mod.padding, slope=mod.slope,
                                                    deconv=deconv))
    with target:
        irmod = apply_hand_schedules(relax.get_pipeline("zero")(bb.get()), target)
    vm = relax.VirtualMachine(tvm.compile(irmod, target=target), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(t.detach().numpy()) for t in (x, mod.weight, mod.w_scale, mod.bias)])
    assert np.abs(got.numpy() - want).max() <= 1e-5 * np.abs(want).max()
