"""The compiler: packages for the host CPU and for the Jetson, their manifests and errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from edgeflow.errors import InputError
from edgeflow.inspect import inspect_package

pytestmark = pytest.mark.tvm
SIZE = (64, 128)


def cubin_cuda_release(cubin: bytes) -> str:
    """The CUDA release of the ptxas that wrote `cubin`: NVIDIA's cubins carry it in the ELF
    header's e_version as major * 10 + minor (126 for CUDA 12.6, 118 for 11.8)."""
    version = int.from_bytes(cubin[20:24], "little")
    return f"{version // 10}.{version % 10}"


def manifest_of(path):
    with tarfile.open(path) as tar:
        return json.load(tar.extractfile("manifest.json")), tar.getnames()


@pytest.fixture(scope="module")
def jetson_package(tmp_path_factory):
    from edgeflow.compile import compile

    return compile("flownet2-s", target="jetson", input_size=SIZE, weights="random",
                   out=tmp_path_factory.mktemp("pkg") / "s-orin.tar").path


def test_jetson_package_is_aarch64_with_sm87_cubin(jetson_package, tmp_path):
    manifest, names = manifest_of(jetson_package)
    assert set(names) == {"manifest.json", "manifest.sha256", "params.npz", "lib/model.so", "lib/kernels.cubin",
                          "lib/kernels.json"}
    with tarfile.open(jetson_package) as tar:
        tar.extractall(tmp_path, filter="data")
    so = (tmp_path / "lib/model.so").read_bytes()
    assert so[:4] == b"\x7fELF" and int.from_bytes(so[18:20], "little") == 183  # EM_AARCH64
    cubin = (tmp_path / "lib/kernels.cubin").read_bytes()
    assert cubin[:4] == b"\x7fELF" and int.from_bytes(cubin[18:20], "little") == 190  # EM_CUDA
    # the cubin's ELF flags carry the SM version (low byte: 87 for sm_87)
    assert int.from_bytes(cubin[48:52], "little") & 0xFF == 87
    assert b"__global__" not in so  # device code ships as the cubin, not as CUDA source
    assert manifest["target"]["cuda_arch"] == "sm_87" and manifest["target"]["cuda_version"] == "12.6"
    kernels = manifest["kernels"]
    assert kernels and all(k["spill_stores"] == 0 and k["spill_loads"] == 0 for k in kernels)
    assert all(k["registers"] <= 255 for k in kernels)
    assert cubin_cuda_release(cubin) == "12.6"  # what ptxas really ran, not what the table says
    convs = [k for k in kernels if "conv2d" in k["name"]]
    if all(k["sass"] is not None for k in kernels):  # read with `make sass-tools`
        assert all(k["sass"]["tensor_core"] == 0 for k in kernels)  # fp32: no tensor cores
        assert all(k["sass"]["ffma"] > 0 for k in convs)
    if shutil.which("file"):
        assert "aarch64" in subprocess.run(["file", str(tmp_path / "lib/model.so")], capture_output=True,
                                           text=True).stdout


def test_kernel_metadata_loads(jetson_package):
    import tvm  # noqa: F401  (registers runtime.LoadMetaDataFromJSON)
    import tvm_ffi

    with tarfile.open(jetson_package) as tar:
        meta = tar.extractfile("lib/kernels.json").read().decode()
        manifest = json.load(tar.extractfile("manifest.json"))
    fmap = tvm_ffi.get_global_func("runtime.LoadMetaDataFromJSON")(meta)
    assert len(fmap) == len(manifest["kernels"])


def test_manifest_hashes_cover_every_file(jetson_package):
    import hashlib

    manifest, names = manifest_of(jetson_package)
    with tarfile.open(jetson_package) as tar:
        body = tar.extractfile("manifest.json").read()
        assert tar.extractfile("manifest.sha256").read().decode().strip() == hashlib.sha256(body).hexdigest()
        for name in names:
            if not name.startswith("manifest."):
                assert hashlib.sha256(tar.extractfile(name).read()).hexdigest() == manifest["files"][name]
    assert set(manifest["files"]) == {n for n in names if not n.startswith("manifest.")}
    assert manifest["format_version"] == 2
    assert set(manifest["versions"]) == {"edgeflow", "tvm", "torch"}


def test_xavier_package_uses_cuda_11_8(tmp_path):
    """JetPack 5 boards get an sm_72 cubin from CUDA 11.8's toolchain."""
    from edgeflow.compile import compile

    path = compile("flownet2-s", target="jetson-xavier-nx", input_size=SIZE, weights="random",
                   out=tmp_path / "s-xavier.tar").path
    manifest, _ = manifest_of(path)
    assert manifest["target"]["cuda_arch"] == "sm_72" and manifest["target"]["cuda_version"] == "11.8"
    assert all(k["spill_stores"] == 0 and k["spill_loads"] == 0 for k in manifest["kernels"])
    with tarfile.open(path) as tar:
        cubin = tar.extractfile("lib/kernels.cubin").read()
    assert int.from_bytes(cubin[48:52], "little") & 0xFF == 72
    assert cubin_cuda_release(cubin) == "11.8"
    from edgeflow.compile import sass

    if sass.cuobjdump("sm_72") is not None:  # CUDA 11.8's disassembler reads sm_72 (make sass-tools)
        assert all(k["sass"] is not None for k in manifest["kernels"])


def test_fp16_jetson_package(tmp_path):
    """fp16: half weights stored in the package, device code without spills, error in tolerance."""
    import io

    from edgeflow.compile import compile

    path = compile("flownet2-s", target="jetson", input_size=SIZE, precision="fp16", weights="random",
                   out=tmp_path / "s16.tar").path
    manifest, _ = manifest_of(path)
    assert manifest["precision"] == "fp16"
    assert manifest["kernels"] and all(k["spill_stores"] == 0 and k["spill_loads"] == 0 for k in manifest["kernels"])
    with tarfile.open(path) as tar:
        params = np.load(io.BytesIO(tar.extractfile("params.npz").read()))
    # weights are stored in half; biases stay fp32 (added to the fp32 accumulator)
    assert {params[n].dtype for n in params.files if n.endswith("weight")} == {np.dtype("float16")}
    assert set(params.files) == set(manifest["params"]["order"])
    assert sum(k["flops_fp16"] for k in manifest["kernels"]) > 0  # half arithmetic on the device
    from edgeflow.compile import sass

    if sass.cuobjdump() is not None:
        units = {k["name"]: k["sass"] for k in manifest["kernels"]}
        tensor = [n for n, c in units.items() if c["tensor_core"] > 0]
        assert tensor and all("conv2d" in n for n in tensor), tensor
        report = inspect_package(path)["summary"]["convolutions"]
        assert report["tensor_core_kernels"] == len(tensor) and 0 < report["tensor_core_flops_share"] <= 1


def test_host_compile_matches_torch(tmp_path):
    import torch
    import tvm
    from tvm import relax

    from edgeflow.compile import frontend, lower
    from edgeflow.models import create
    from edgeflow.targets import get

    torch.manual_seed(0)
    model = create("flownet2-s", weights=None)
    rm = frontend.to_relax(model, SIZE)
    mod, params, _names = lower.prepare(rm.mod, rm.params, rm.param_names)
    ex, code = lower.build(mod, get("host"))
    assert code is None
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    a = rng.random((1, 3, *SIZE), dtype=np.float32)
    b = np.roll(a, 2, axis=3)
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), *[tvm.runtime.tensor(p) for p in params])
    got = (got[0] if not hasattr(got, "numpy") else got).numpy()
    with torch.no_grad():
        want = model(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert np.sqrt(((got - want) ** 2).sum(1)).mean() < 0.01


def test_bad_inputs(tmp_path):
    from edgeflow.compile import compile

    with pytest.raises(InputError, match="choices: .*jetson"):
        compile("flownet2-s", target="jetson-tx9", input_size=SIZE, weights="random", out=tmp_path / "x.tar")
    with pytest.raises(InputError, match="multiples of 64"):
        compile("flownet2-s", target="host", input_size=(100, 128), weights="random", out=tmp_path / "x.tar")
    with pytest.raises(InputError, match="precision='fp8'"):
        compile("flownet2-s", target="host", input_size=SIZE, precision="fp8", weights="random", out=tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def test_targets_table():
    from edgeflow import targets

    assert targets.get("jetson").name == "jetson-orin-nano"
    for name in targets.names():
        board = targets.get(name)
        t = board.tvm_target()
        if board.is_cuda:
            assert t.kind.name == "cuda" and str(t.attrs["arch"]) == board.cuda_arch
            assert t.host.kind.name == "llvm" and str(t.host.attrs["mtriple"]) == "aarch64-linux-gnu"
            assert board.peak_fp16_tflops > 0 and board.memory_bandwidth_gbs > 0
    orin = targets.get("jetson-orin-nano").tvm_target()
    assert str(orin.host.attrs["mcpu"]) == "cortex-a78"  # TVM's own tag says carmel


def test_cuda_hook_is_scoped_per_build():
    """Two boards built in one process, in two threads at once, each get their own device code,
    and TVM's `target.build.cuda` is TVM's own again afterwards."""
    import threading

    import tvm
    from tvm import relax

    from edgeflow.compile import lower
    from edgeflow.targets import get

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 16, 16), "float32"))
    w = relax.Var("w", relax.TensorType((8, 4, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, w, padding=1))
        bb.emit_func_output(out)
    mod = bb.get()
    original = tvm.get_global_func(lower.CUDA_BUILD)
    results, errors = {}, []

    def build(name):
        try:
            results[name] = lower.build(mod, get(name))[1]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(n,)) for n in ("jetson-orin-nano", "jetson-xavier-nx")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    orin, xavier = results["jetson-orin-nano"], results["jetson-xavier-nx"]
    assert orin is not xavier and orin.func_info and orin.source and xavier.source
    assert int.from_bytes(orin.cubin[48:52], "little") & 0xFF == 87 and cubin_cuda_release(orin.cubin) == "12.6"
    assert int.from_bytes(xavier.cubin[48:52], "little") & 0xFF == 72 and cubin_cuda_release(xavier.cubin) == "11.8"
    assert tvm.get_global_func(lower.CUDA_BUILD).same_as(original)
    with lower.capture_cuda(lower.DeviceCode()):  # the check above can fail: inside, it is ours
        assert not tvm.get_global_func(lower.CUDA_BUILD).same_as(original)


def test_cli_compile_accuracy_gate_and_force(tmp_path, capsys, monkeypatch):
    """The accuracy refusal exits with its own code and writes nothing; --force writes, and the
    command prints the result's one line. (The tolerance is lowered to 0 so the ~1e-6 px of a
    float32 build exceeds it.)"""
    import edgeflow.compile as compiler
    from edgeflow.cli import main
    from edgeflow.errors import AccuracyError

    monkeypatch.setitem(compiler.TOLERANCE, "fp32", 0.0)
    out = tmp_path / "s.tar"
    argv = ["compile", "flownet2-s", "--target", "host", "--size", "64x128", "--weights", "random", "-o", str(out)]
    assert main(argv) == AccuracyError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("Error: compiled flownet2-s differs from the torch model by EPE")
    assert "force=True" in err[-1] and not out.exists() and not list(tmp_path.glob("*.tmp"))
    assert main(argv + ["--force"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{out}: flownet2-s for host, fp32, EPE vs torch ") and line.endswith("unsigned")
    manifest, _ = manifest_of(out)
    assert manifest["accuracy"]["tolerance"] == 0.0 and manifest["accuracy"]["epe_vs_torch"] > 0
