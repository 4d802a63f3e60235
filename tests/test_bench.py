"""`edgeflow bench`: JSON shape and consistency (never timings), the ONNX export with our custom
ops decomposed, the one-line error for a package of another device."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeflow.errors import InputError, PackageError
from edgeflow.models.ops import correlation_reference, warp_reference
from edgeflow.onnx_export import correlation_decomposition, export_onnx, warp_decomposition

SIZE = (64, 128)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    pytest.importorskip("tvm")
    from edgeflow.compile import compile

    torch.manual_seed(3)
    return compile("flownet2-s", target="host", input_size=SIZE, weights="random",
                   out=tmp_path_factory.mktemp("pkg") / "s-host.tar").path


@pytest.fixture(autouse=True)
def package_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDGEFLOW_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))


def run_ort(blob: bytes, feed: dict) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.tvm
def test_bench_json(package, capsys):
    from edgeflow.cli import main

    assert main(["bench", str(package), "--vs", "onnxruntime,torch", "--json", "--runs", "2", "--warmup", "1",
                 "--threads", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["ms"]) == {"edgeflow", "onnxruntime", "torch"} and set(r["ratio"]) == {"onnxruntime", "torch"}
    assert all(v > 0 for v in r["ms"].values())
    assert r["model"] == "flownet2-s" and r["input_size"] == list(SIZE) and r["runs"] == 2
    assert r["threads"] == {"requested": 1, "edgeflow": 1, "onnxruntime": 1, "torch": 1}
    assert r["epe_vs_torch"]["onnxruntime"] < 1e-3 and r["epe_vs_torch"]["edgeflow"] < 0.01
    assert r["edgeflow_end_to_end_ms"] >= r["edgeflow_stages_ms"]["network"] > 0
    assert all(s["min_ms"] <= s["median_ms"] <= s["max_ms"] for s in r["stats"].values())


@pytest.mark.tvm
def test_bench_one_peer_and_bad_flags(package, capsys):
    from edgeflow.benchmark import bench

    r = bench(package, vs="torch", threads=1, runs=1, warmup=0)
    assert set(r["ms"]) == {"edgeflow", "torch"} and set(r["ratio"]) == {"torch"}
    with pytest.raises(InputError, match="choices: onnxruntime, torch"):
        bench(package, vs="tensorrt")
    with pytest.raises(InputError, match="runs=0"):
        bench(package, runs=0)
    # TVM read its spin count when this process's first pool started: no pool that never spins now
    with pytest.raises(InputError, match="spin=False: TVM's pool in this process spins 300000 times"):
        bench(package, vs="torch", threads=1, runs=1, spin=False)


def test_cuda_package_needs_its_device(tmp_path, capsys):
    """A Jetson package is refused before anything loads: one line naming the way out."""
    from edgeflow.cli import main
    from edgeflow.runtime.format import write_package

    manifest = {"model": {"name": "flownet2-s", "stages": "s", "width": 0.375}, "precision": "fp32",
                "pruning": {"ratio": 0.0}, "quantization": None, "versions": {}, "accuracy": {},
                "input": {"height": 64, "width": 128, "dtype": "float32"}, "output": {"dtype": "float32"},
                "target": {"name": "jetson-orin-nano", "kind": "cuda", "cuda_arch": "sm_87", "cuda_version": "12.6",
                           "host_triple": "aarch64-linux-gnu"},
                "params": {"order": []}}
    files = {"lib/model.so": b"elf", "lib/kernels.cubin": b"cubin", "lib/kernels.json": b"{}", "params.npz": b""}
    orin = tmp_path / "s-orin.tar"
    write_package(orin, manifest, files)
    assert main(["bench", str(orin), "--json"]) == PackageError.exit_code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and len(err.splitlines()) == 1
    assert err.startswith("Error: bench needs the package's device") and "jetson-orin-nano (cuda sm_87)" in err
    assert f"edgeflow inspect {orin}" in err


def test_decompositions_match_reference(rng):
    img = torch.from_numpy(rng.random((2, 3, 40, 56), dtype=np.float32))
    flow = torch.from_numpy(rng.standard_normal((2, 2, 40, 56)).astype(np.float32) * 4)
    flow[:, 0, :, :2] = -0.5  # sample points just left of the image
    flow[:, 0, :, -2:] = 0.75  # between the last column and the outside: FlowWarp's clamped neighbour
    flow[:, 1, -1, :] = 0.25
    flow[:, :, 3, 3] = 0.0
    flow[0, 0, 7, 7] = float("nan")
    assert torch.allclose(warp_decomposition(img, flow), warp_reference(img, flow), atol=1e-4)
    for args in [(1, 20, 1, 2, 20), (1, 4, 1, 1, 4), (3, 4, 1, 1, 4), (1, 6, 2, 2, 6)]:
        f1, f2 = (torch.from_numpy(rng.standard_normal((2, 8, 24, 40)).astype(np.float32)) for _ in range(2))
        assert torch.allclose(correlation_decomposition(f1, f2, *args), correlation_reference(f1, f2, *args),
                              atol=1e-5), args


def test_onnx_export_of_warp_matches_reference(rng):
    """ORT's GridSample with our border handling, on flows that reach every border."""
    from edgeflow.models.ops import warp

    class Warp(torch.nn.Module):
        def forward(self, img1, img2):
            return warp(img1, (img2[:, :2] - 0.5) * 24)

    a, b = (rng.random((1, 3, *SIZE), dtype=np.float32) for _ in range(2))
    got = run_ort(export_onnx(Warp(), SIZE), {"img1": a, "img2": b})
    want = warp_reference(torch.from_numpy(a), (torch.from_numpy(b[:, :2]) - 0.5) * 24).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_onnx_export_of_flownet2_cs_matches_torch(rng):
    """Correlation and warp inside a real network: the exported flow is the torch flow."""
    from edgeflow.models import create

    onnx = pytest.importorskip("onnx")

    torch.manual_seed(5)
    model = create("flownet2-cs", weights=None)
    blob = export_onnx(model, SIZE)
    nodes = onnx.load_from_string(blob).graph.node
    assert "GridSample" in {n.op_type for n in nodes} and {n.domain for n in nodes} == {""}
    a, b = (rng.random((1, 3, *SIZE), dtype=np.float32) for _ in range(2))
    got = run_ort(blob, {"img1": a, "img2": b})
    with torch.no_grad():
        want = model(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert np.sqrt(((got - want) ** 2).sum(1)).mean() < 1e-3
    assert np.abs(got - want).max() < 1e-3


@pytest.mark.tvm
@pytest.mark.slow
def test_suite_on_a_tiny_size(tmp_path):
    """bench/suite.py end to end at 64x128, one run: every section, the same network in every
    engine (equal EPE), a table and a PNG plot; no Jetson compile (minutes each)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, str(root / "bench" / "suite.py"), "--models", "flownet2-s", "--sizes", "64x128",
                        "--threads", "1", "--runs", "1", "--pairs", "2", "--predict", "", "--out", str(out)],
                       capture_output=True, text=True, env={**os.environ, "EDGEFLOW_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((out / "suite.json").read_text())
    (pkg,) = r["packages"]
    assert pkg["compile_seconds"] > 0 and pkg["rss"]["peak_mb"] > pkg["rss"]["imports_mb"] > 0
    (s,) = r["speed"]
    assert s["input_size"] == [64, 128] and s["threads"]["requested"] == 1 and s["spin"] is True
    assert s["ratio"]["onnxruntime"] == pytest.approx(s["ms"]["edgeflow"] / s["ms"]["onnxruntime"], rel=1e-3)
    assert {c["method"] for c in r["classical"]} == {"dis-ultrafast", "dis-fast", "dis-medium", "farneback"}
    acc = r["accuracy"]
    assert acc["_pairs"] == 2 and {"edgeflow fp32", "onnxruntime", "pytorch", "dis-medium", "farneback"} <= set(acc)
    for peer in ("onnxruntime", "pytorch"):  # one network, three engines: one EPE
        assert acc[peer]["epe"] == pytest.approx(acc["edgeflow fp32"]["epe"], abs=0.01)
    assert (out / "epe_vs_ms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "suite.md").read_text()
    assert "| flownet2-s | 64x128 | 1 |" in table and "| dis-medium | 64x128 | 1 |" in table
