"""`edgeflow inspect`: the boards' occupancy and roofline model, and reports of real Jetson packages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgeflow import targets
from edgeflow.cli import main
from edgeflow.inspect import PREDICTION, format_report, inspect_package

CUDA_BOARDS = [b for b in targets.BOARDS.values() if b.is_cuda]


# ------------------------------------------------------------------ occupancy and roofline


@pytest.mark.parametrize("arch,registers,threads,shared,blocks,occupancy,limited_by", [
    ("sm_87", 64, 256, 0, 4, 0.6667, "registers"),  # 2048 regs/warp: 8 warps per partition
    ("sm_87", 32, 256, 0, 6, 1.0, "threads"),  # 48 warps per SM at most
    ("sm_87", 40, 128, 0, 12, 1.0, "threads"),
    ("sm_87", 16, 64, 0, 16, 0.6667, "blocks"),  # 16 blocks per SM at most
    ("sm_87", 32, 128, 48 * 1024, 3, 0.25, "shared"),  # 48 kB + 1 kB reserved per block of 164 kB
    ("sm_87", 255, 32, 0, 8, 0.1667, "registers"),  # 8160 -> 8192 regs/warp: 2 warps per partition
    ("sm_87", 64, 1025, 0, 0, 0.0, "launch"),  # more threads than a block may have
    ("sm_72", 64, 256, 0, 4, 0.5, "registers"),  # Volta: 64 warps per SM
    ("sm_72", 32, 256, 48 * 1024, 2, 0.25, "shared"),  # 96 kB per SM
    ("sm_53", 32, 1024, 0, 2, 1.0, "threads"),  # Nano: 32 x 1024 = 32K registers, the per-block limit
    ("sm_53", 33, 1024, 0, 0, 0.0, "launch"),  # 40 regs/thread after rounding: over 32K per block
])
def test_occupancy_known_values(arch, registers, threads, shared, blocks, occupancy, limited_by):
    board = next(b for b in CUDA_BOARDS if b.cuda_arch == arch)
    occ = board.occupancy(registers, threads, shared)
    assert (occ["blocks_per_sm"], occ["occupancy"], occ["limited_by"]) == (blocks, occupancy, limited_by)
    assert occ["warps_per_sm"] == blocks * -(-threads // 32)


def test_boards_inherit_their_arch_limits():
    for board in CUDA_BOARDS:
        limits = board.limits()
        assert None not in limits.values(), board.name
        # the table's fp32 peak is SMs x clock x 2 x FMA lanes
        peak = board.sm_count * board.gpu_clock_mhz * 1e6 * 2 * board.fp32_lanes_per_sm / 1e12
        assert board.peak_fp32_tflops == pytest.approx(peak, rel=0.01), board.name
    nano = targets.get("jetson-nano")
    assert nano.max_registers_per_block == 32768 and nano.tvm_target_json()["registers_per_block"] == 32768
    assert targets.get("jetson").reserved_shared_memory_per_block == 1024
    assert targets.get("host").limits()["warp_size"] is None


def test_roofline():
    orin = targets.get("jetson")
    assert orin.roofline_seconds(2.09e12, 1e6) == (pytest.approx(1.0), "compute")
    assert orin.roofline_seconds(1e6, 102e9) == (pytest.approx(1.0), "memory")
    # fp16 arithmetic runs at the fp16 peak, the rest at the fp32 peak
    t, _ = orin.roofline_seconds(2.09e12 + 16.71e12, 0, flops_fp16=16.71e12)
    assert t == pytest.approx(2.0)


# ------------------------------------------------------------------ reports without TVM


def _write(tmp_path, target, kernels=None):
    from edgeflow.runtime.format import write_package

    manifest = {"model": {"name": "flownet2-s", "width": 0.375}, "input": {"height": 64, "width": 128},
                "output": {}, "precision": "fp32", "target": target, "params": {"order": []},
                "pruning": {"ratio": 0.0}, "quantization": None, "versions": {},
                "accuracy": {"epe_vs_torch": 0.001, "tolerance": 0.01, "measured_on": "generated pairs"}}
    if kernels is not None:
        manifest["kernels"] = kernels
    write_package(tmp_path / "p.tar", manifest, {"lib/model.so": b"\x7fELF", "params.npz": b"x"})
    return tmp_path / "p.tar"


def test_cpu_package_report(tmp_path):
    report = inspect_package(_write(tmp_path, {"name": "host", "kind": "cpu", "machine": "x86_64"}))
    assert "kernels" not in report and "CUDA packages only" in report["note"]
    assert report["files"] == {"lib/model.so": 4, "params.npz": 1}
    text = format_report(report)
    assert "host" in text and "EPE 0.001" in text and "CUDA packages only" in text


def test_package_without_kernel_statistics(tmp_path):
    """Packages compiled before the FLOP/byte counts: resources shown, no prediction."""
    kernel = {"name": "k_kernel", "registers": 32, "spill_stores": 0, "spill_loads": 4, "shared_bytes": 0,
              "stack_bytes": 0}
    report = inspect_package(_write(tmp_path, {"name": "jetson-orin-nano", "kind": "cuda", "cuda_arch": "sm_87"},
                                    [kernel]))
    assert report["summary"]["spill_bytes"] == 4 and report["summary"]["predicted_fps"] is None
    assert "not available" in format_report(report)


# ------------------------------------------------------------------ real Jetson packages


@pytest.fixture(scope="module")
def s_package(tmp_path_factory):
    from edgeflow.compile import compile

    return compile("flownet2-s", target="jetson", input_size=(64, 128), weights="random",
                   out=tmp_path_factory.mktemp("pkg") / "s-orin.tar").path


def _conv_flops(name: str, size: tuple[int, int]) -> int:
    """2 x multiply-adds of every convolution and deconvolution of `name` at `size`, from the
    torch model's layer shapes."""
    import torch

    from edgeflow.models import create

    total = 0

    def count(module, inputs, output):
        nonlocal total
        w = module.weight
        if isinstance(module, torch.nn.ConvTranspose2d):  # each input pixel scatters Cout x k x k
            total += 2 * inputs[0].shape[2] * inputs[0].shape[3] * w.numel()
        else:
            total += 2 * output.shape[2] * output.shape[3] * w.numel()

    model = create(name, weights=None)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, 3, *size), torch.zeros(1, 3, *size))
    return total


@pytest.mark.tvm
def test_flownet2_s_report(s_package, capsys):
    report = inspect_package(s_package)
    kernels, summary = report["kernels"], report["summary"]
    assert kernels and summary["kernels"] == len(kernels)
    assert summary["spill_bytes"] == 0 and all(k["spill_stores"] == k["spill_loads"] == 0 for k in kernels)
    assert summary["max_registers"] == max(k["registers"] for k in kernels) <= 255
    for k in kernels:
        assert k["threads_per_block"] == k["block"][0] * k["block"][1] * k["block"][2] <= 1024
        assert k["grid"][0] >= 1 and 0 < k["occupancy"] <= 1 and k["bytes"] > 0 and k["roofline_us"] > 0
        assert k["op"] is None  # flownet2-s has no correlation or warp
    convs = [k for k in kernels if "conv2d" in k["name"]]
    assert convs and all(k["flops"] > 0 for k in convs)
    # the first convolution, 6 -> 24 channels 7x7 stride 2 onto 32x64: at least its useful work
    first = next(k for k in kernels if k["name"] == "fused_conv2d_add1_leaky_relu_kernel")
    assert first["flops"] >= 2 * 6 * 49 * 24 * 32 * 64
    # the prediction against bounds from the Orin Nano datasheet (2.09 fp32 TFLOPS, 102 GB/s) and
    # the network's convolution work counted here with torch hooks: units and sums, independently
    conv_flops = _conv_flops("flownet2-s", (64, 128))
    assert summary["flops"] >= conv_flops
    lower_ms = max(conv_flops / 2.09e12, summary["bytes"] / 102e9) * 1e3
    upper_ms = (summary["flops"] / 2.09e12 + summary["bytes"] / 102e9) * 1e3
    assert lower_ms <= summary["roofline_ms"] <= upper_ms * 1.001
    # the prediction: achievable fractions of those peaks, so above the roofline, plus launches
    lo, hi = summary["predicted_range_ms"]
    launches_ms = summary["launches"] * 1e-3
    assert summary["roofline_ms"] + 3 * launches_ms <= lo * 1.001 and lo <= summary["predicted_ms"] <= hi
    assert hi <= upper_ms / 0.15 + 10 * launches_ms
    assert summary["predicted_fps"] == pytest.approx(1e3 / summary["predicted_ms"], rel=1e-3)

    assert main(["inspect", str(s_package)]) == 0
    text = capsys.readouterr().out
    assert f"{PREDICTION}: {lo:.2f} to {hi:.2f} ms per inference" in text and "on jetson-orin-nano" in text
    assert "model: achievable fractions" in text
    assert f"summary: {len(kernels)} kernels" in text and "total spills 0 B" in text
    assert main(["inspect", str(s_package), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"] == json.loads(json.dumps(summary))


@pytest.mark.tvm
def test_inspect_needs_neither_tvm_nor_torch(s_package):
    code = ("import sys; sys.modules['tvm'] = sys.modules['torch'] = None\n"
            "from edgeflow.inspect import inspect_package\n"
            f"print(inspect_package({str(s_package)!r})['summary']['predicted_fps'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) > 0


@pytest.mark.tvm
def test_flownet2_c_correlation_kernel(tmp_path):
    from edgeflow.compile import compile

    path = compile("flownet2-c", target="jetson", input_size=(64, 256), weights="random", out=tmp_path / "c.tar").path
    report = inspect_package(path)
    (corr,) = [k for k in report["kernels"] if k["op"] == "correlation"]
    assert corr["name"].startswith("correlation")
    assert corr["spill_stores"] == corr["spill_loads"] == 0
    # 441 displacements x 8x32 pixels x 96 channels, one multiply-add each (plus the epilogue)
    assert 2 * 441 * 8 * 32 * 96 <= corr["flops"] < 1.1 * 2 * 441 * 8 * 32 * 96
    assert corr["bytes"] == (2 * 96 * 8 * 32 + 441 * 8 * 32) * 4  # both inputs read, the output written
    assert corr["shared_bytes"] > 0 and corr["occupancy"] > 0
    assert report["summary"]["hand_written"] == ["correlation"] and report["summary"]["spill_bytes"] == 0
    assert "correlation_kernel" in format_report(report)
