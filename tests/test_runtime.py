"""The device runtime: package verification, Engine against the torch model, streaming, `edgeflow run`.

One small package (flownet2-s, random weights, 64x128, host CPU) is compiled per session.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import count_video_frames

from edgeflow.errors import InputError, PackageError

pytestmark = pytest.mark.tvm

H, W = 64, 128


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def package_cache(tmp_path_factory):
    """Extract packages into a per-session cache, not ~/.cache."""
    old = os.environ.get("EDGEFLOW_CACHE")
    os.environ["EDGEFLOW_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("EDGEFLOW_CACHE", None)
    else:
        os.environ["EDGEFLOW_CACHE"] = old


@pytest.fixture(scope="session")
def torch_model():
    import torch

    from edgeflow.models import create

    torch.manual_seed(7)
    return create("flownet2-s", weights=None)


@pytest.fixture(scope="session")
def package(torch_model, tmp_path_factory) -> Path:
    from edgeflow.compile import compile

    out = tmp_path_factory.mktemp("pkg") / "flownet2-s-host.tar"
    return compile(torch_model, target="host", input_size=(H, W), precision="fp32", out=out).path


def build_package_directly(model, out: Path) -> Path:
    """A package in the documented format, built with TVM directly, independently of the writer."""
    import platform
    import tempfile

    import torch
    import tvm
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program

    example = (torch.zeros(1, 3, H, W), torch.zeros(1, 3, H, W))
    with torch.no_grad():
        ep = torch.export.export(model.eval(), example)
    names = [s.target for s in ep.graph_signature.input_specs if s.kind.name in ("PARAMETER", "BUFFER")]
    mod, params = detach_params(from_exported_program(ep, keep_params_as_input=True))
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    with tempfile.TemporaryDirectory() as d:
        ex.export_library(f"{d}/model.so")
        lib = Path(f"{d}/model.so").read_bytes()
    npz = io.BytesIO()
    np.savez(npz, **{n: p.numpy() for n, p in zip(names, params["main"])})
    manifest = {
        "format_version": 2,
        "model": {"name": "flownet2-s", "stages": "s", "width": 0.375, "weights": "random", "weights_sha256": None},
        "input": {"height": H, "width": W, "dtype": "float32", "layout": "NCHW", "color": "RGB", "range": [0, 1]},
        "output": {"dtype": "float32", "units": "pixels"},
        "precision": "fp32", "pruning": {"ratio": 0.0}, "quantization": None,
        "target": {"name": "host", "kind": "cpu", "tvm_target": {"kind": "llvm"}, "cuda_arch": None,
                   "cuda_version": None, "host_triple": None, "machine": platform.machine()},
        "versions": {"edgeflow": "0.1.0", "tvm": tvm.__version__, "torch": torch.__version__},
        "params": {"order": names},
        "accuracy": {"epe_vs_torch": 0.0, "frames": 0, "tolerance": 0.01},
    }
    return write_tar(out, manifest, {"lib/model.so": lib, "params.npz": npz.getvalue()})


@pytest.fixture(scope="session")
def engine(package):
    from edgeflow.runtime import load

    return load(package)


@pytest.fixture(scope="session")
def frames(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A directory of 5 PNG frames (72x100, a textured pattern drifting right) and the frames."""
    d = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(3)
    base = cv2.GaussianBlur(rng.integers(0, 256, (72, 140, 3), dtype=np.uint8), (5, 5), 0)
    imgs = [np.ascontiguousarray(base[:, 20 - 2 * i:120 - 2 * i]) for i in range(5)]
    for i, img in enumerate(imgs):
        cv2.imwrite(str(d / f"frame_{i}.png"), img)
    return d, imgs


# -- helpers --------------------------------------------------------------------------------------

def read_tar(path: Path) -> tuple[dict, dict[str, bytes]]:
    """(manifest, {name: bytes} of the other files) of a package, the digest and signature left out."""
    with tarfile.open(path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    files.pop("manifest.sha256", None)
    files.pop("manifest.sig", None)
    return json.loads(files.pop("manifest.json")), files


def write_tar(path: Path, manifest: dict, files: dict[str, bytes], *, rehash: bool = True, redigest: bool = True,
              extra_members: dict[str, bytes] | None = None) -> Path:
    """A package tar in the documented format, written here independently of edgeflow's writer:
    canonical manifest.json (sorted keys, indent 1, ASCII) and manifest.sha256. With `rehash` the
    manifest's sha256 entries are made to match `files`; with `redigest` manifest.sha256 is made
    to match the manifest (else the original package's digest is kept: pass it in extra_members)."""
    if rehash:
        manifest = dict(manifest, files={n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    entries = {"manifest.json": body}
    if redigest:
        entries["manifest.sha256"] = hashlib.sha256(body).hexdigest().encode()
    entries.update({**files, **(extra_members or {})})
    with tarfile.open(path, "w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def torch_flow(model, img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
    """The torch model's flow HxWx2 for uint8 BGR images at the compiled size."""
    import torch

    def t(img):
        return torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1)))[None].float() / 255

    with torch.no_grad():
        return model(t(img1), t(img2))[0].numpy().transpose(1, 2, 0)


def epe(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum(-1)).mean())


def random_pair(rng, h, w, channels=3):
    shape = (h, w, channels) if channels else (h, w)
    img1 = cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (5, 5), 0)
    img2 = np.roll(img1, (1, 3), (0, 1))
    return img1, img2


# -- Engine ---------------------------------------------------------------------------------------

def test_manifest_and_repr(engine):
    m = engine.manifest
    assert m["format_version"] == 2
    assert (m["input"]["height"], m["input"]["width"]) == (H, W)
    assert m["target"]["kind"] == "cpu"
    assert "on cpu" in repr(engine)


def test_engine_matches_torch_at_compiled_size(engine, torch_model, rng):
    img1, img2 = random_pair(rng, H, W)
    flow = engine(img1, img2)
    assert flow.dtype == np.float32 and flow.shape == (H, W, 2)
    assert epe(flow, torch_flow(torch_model, img1, img2)) < 0.01


@pytest.mark.parametrize("size", [(96, 160), (48, 100)])  # enlarged in, shrunk in
def test_engine_resizes_and_scales(engine, torch_model, rng, size):
    h, w = size
    img1, img2 = random_pair(rng, h, w)
    flow = engine(img1, img2)
    assert flow.shape == (h, w, 2)
    interp = cv2.INTER_AREA if H <= h and W <= w else cv2.INTER_LINEAR  # shrinking in: area
    net = torch_flow(torch_model, *(cv2.resize(i, (W, H), interpolation=interp) for i in (img1, img2)))
    back = cv2.INTER_AREA if h <= H and w <= W else cv2.INTER_LINEAR
    want = cv2.resize(net, (w, h), interpolation=back) * np.array([w / W, h / H], np.float32)
    assert epe(flow, want) < 0.01


def test_engine_gray_input(engine, rng):
    g1, g2 = random_pair(rng, H, W, channels=0)
    flow = engine(g1, g2)
    assert flow.shape == (H, W, 2)
    as_bgr = engine(cv2.cvtColor(g1, cv2.COLOR_GRAY2BGR), cv2.cvtColor(g2, cv2.COLOR_GRAY2BGR))
    np.testing.assert_allclose(flow, as_bgr, atol=1e-5)
    np.testing.assert_allclose(engine(g1[..., None], g2[..., None]), flow, atol=1e-5)


def test_engine_rejects_bad_inputs(engine, rng):
    img1, _ = random_pair(rng, H, W)
    with pytest.raises(InputError, match="differ in size: 64x128 and 32x32"):
        engine(img1, img1[:32, :32])
    with pytest.raises(InputError, match="uint8"):
        engine(img1.astype(np.float32), img1.astype(np.float32))
    with pytest.raises(InputError, match="shape"):
        engine(img1[..., :2], img1[..., :2])
    with pytest.raises(InputError, match="numpy"):
        engine([[1]], [[1]])


def test_run_tensor(engine, torch_model, rng):
    img1, img2 = random_pair(rng, H, W)
    x1, x2 = engine.prepare(img1), engine.prepare(img2)
    assert x1.shape == (1, 3, H, W) and x1.dtype == np.float32 and 0 <= x1.min() and x1.max() <= 1
    flow = engine.run_tensor(x1, x2)
    assert flow.shape == (2, H, W)
    assert epe(flow.transpose(1, 2, 0), torch_flow(torch_model, img1, img2)) < 0.01
    with pytest.raises(InputError, match="shape"):
        engine.run_tensor(x1[:, :, :32], x2[:, :, :32])


def test_package_in_the_documented_format(torch_model, tmp_path, rng):
    """The reader against the format as documented, not only against edgeflow's own writer."""
    from edgeflow.runtime import load

    engine = load(build_package_directly(torch_model, tmp_path / "direct.tar"))
    img1, img2 = random_pair(rng, H, W)
    assert epe(engine(img1, img2), torch_flow(torch_model, img1, img2)) < 0.01


# -- package verification -------------------------------------------------------------------------

def test_read_package_caches_extraction(package):
    from edgeflow.runtime.format import read_package

    first = read_package(package)
    manifest, d1 = first.manifest, first.directory
    d2 = read_package(package).directory
    assert d1 == d2 and (d1 / "lib" / "model.so").is_file() and (d1 / "params.npz").is_file()
    assert d1.name == hashlib.sha256(package.read_bytes()).hexdigest()
    assert set(manifest["files"]) == {"lib/model.so", "params.npz"}
    params = (d1 / "params.npz").read_bytes()
    (d1 / "params.npz").write_bytes(params[:-1] + bytes([params[-1] ^ 1]))  # damage the cache
    d3 = read_package(package).directory
    assert d3 == d1 and (d1 / "params.npz").read_bytes() == params  # re-hashed and extracted again


def test_tampered_library(package, tmp_path):
    from edgeflow.runtime import load

    manifest, files = read_tar(package)
    lib = bytearray(files["lib/model.so"])
    lib[len(lib) // 2] ^= 0xFF
    bad = write_tar(tmp_path / "bad.tar", manifest, {**files, "lib/model.so": bytes(lib)}, rehash=False)
    with pytest.raises(PackageError, match="tampered package: sha256 of lib/model.so does not match its manifest"):
        load(bad)
    assert not (Path(os.environ["EDGEFLOW_CACHE"]) / "packages" / hashlib.sha256(bad.read_bytes()).hexdigest()).exists()


def test_missing_and_extra_files(package, tmp_path):
    from edgeflow.runtime.format import read_package

    manifest, files = read_tar(package)
    missing = write_tar(tmp_path / "missing.tar", manifest, {"lib/model.so": files["lib/model.so"]}, rehash=False)
    with pytest.raises(PackageError, match="params.npz is listed in its manifest but missing"):
        read_package(missing)
    extra = write_tar(tmp_path / "extra.tar", manifest, files, rehash=False, extra_members={"lib/evil.so": b"x"})
    with pytest.raises(PackageError, match="lib/evil.so is not listed"):
        read_package(extra)


def test_unknown_format_version(package, tmp_path):
    from edgeflow.runtime import load

    manifest, files = read_tar(package)
    bad = write_tar(tmp_path / "v1.tar", dict(manifest, format_version=1), files)
    with pytest.raises(PackageError, match=r"unknown package format version 1 \(this runtime reads 2; recompile"):
        load(bad)


def test_not_a_package(tmp_path):
    from edgeflow.runtime import load

    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(PackageError, match="junk.tar: not a readable package tar"):
        load(junk)
    with pytest.raises(PackageError, match="no such package file"):
        load(tmp_path / "absent.tar")
    no_manifest = tmp_path / "nomanifest.tar"
    with tarfile.open(no_manifest, "w") as tar:
        info = tarfile.TarInfo("params.npz")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(PackageError, match=r"nomanifest.tar: not an edgeflow package of format 2 \(no manifest.json\)"):
        load(no_manifest)


def test_unsafe_member_refused(package, tmp_path):
    from edgeflow.runtime.format import read_package

    manifest, files = read_tar(package)
    bad = write_tar(tmp_path / "unsafe.tar", manifest, files, rehash=False, extra_members={"../escape": b"x"})
    with pytest.raises(PackageError, match="member '../escape' is not a relative path inside the package"):
        read_package(bad)
    assert not (tmp_path.parent / "escape").exists()


def other_arch() -> str:
    from edgeflow.targets import machine_arch

    return "x86_64" if machine_arch() == "aarch64" else "aarch64"


def test_cuda_package_without_gpu(package, tmp_path):
    import tvm

    from edgeflow.runtime import load

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a CUDA device")
    manifest, files = read_tar(package)
    target = dict(manifest["target"], name="jetson-orin-nano", kind="cuda", cuda_arch="sm_87",
                  host_triple="aarch64-linux-gnu")
    bad = write_tar(tmp_path / "jetson.tar", dict(manifest, target=target), files)
    with pytest.raises(PackageError, match=r"^package targets jetson-orin-nano \(cuda sm_87\); "
                                           r"this machine has no CUDA device$"):
        load(bad)


def test_package_for_other_cpu(package, tmp_path):
    from edgeflow.runtime import load
    from edgeflow.targets import machine_arch

    manifest, files = read_tar(package)
    triple = f"{other_arch()}-linux-gnu"
    bad = write_tar(tmp_path / "cross.tar", dict(manifest, target=dict(manifest["target"], host_triple=triple)), files)
    with pytest.raises(PackageError, match=f"^package is for {triple}; this machine is {machine_arch()}$"):
        load(bad)
    native = write_tar(tmp_path / "native.tar",
                       dict(manifest, target=dict(manifest["target"], host_triple=None, machine=other_arch())), files)
    with pytest.raises(PackageError, match=f"compiling machine \\({other_arch()}\\); this machine is {machine_arch()}"):
        load(native)
    with pytest.raises(PackageError, match="cannot run on device 'cuda'"):
        load(package, device="cuda")


def test_runtime_imports_no_torch(package, tmp_path):
    """Load and run a package in a process where `import torch` fails."""
    script = textwrap.dedent(f"""
        import sys

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")

        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        import edgeflow.runtime as rt

        engine = rt.load({str(package)!r})
        rng = np.random.default_rng(0)
        img1 = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
        flow = engine(img1, np.roll(img1, 2, axis=1))
        assert flow.shape == (50, 70, 2) and np.isfinite(flow).all()
        results = list(engine.stream({str(tmp_path / "f")!r}))
        assert len(results) == 2
        banned = [m for m in sys.modules if m.split(".")[0] == "torch" or m.startswith(("edgeflow.compile", "edgeflow.models"))]
        assert not banned, banned
        print("ok", flow.shape)
    """)
    (tmp_path / "f").mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "f" / f"{i}.png"), np.full((40, 60, 3), 40 * i, np.uint8))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok (50, 70, 2)" in proc.stdout


@pytest.mark.gpu
def test_cuda_package_runs_on_gpu(tmp_path):
    """A Jetson-class package on a real GPU (skipped where there is none)."""
    import tvm

    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA device")
    from edgeflow.compile import compile
    from edgeflow.runtime import load
    from edgeflow.targets import machine_arch

    if machine_arch() != "aarch64":
        pytest.skip("the Jetson packages carry aarch64 host code")
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    board = {"sm_87": "jetson-orin-nano", "sm_72": "jetson-xavier-nx", "sm_53": "jetson-nano"}.get(arch)
    if board is None:
        pytest.skip(f"no Jetson board with {arch}")
    pkg = compile("flownet2-s", target=board, input_size=(H, W), weights=None, out=tmp_path / "gpu.tar").path
    engine = load(pkg)
    rng = np.random.default_rng(0)
    img1, img2 = random_pair(rng, H, W)
    flow = engine(img1, img2)
    assert flow.shape == (H, W, 2) and np.isfinite(flow).all()


# -- streaming ------------------------------------------------------------------------------------

def test_stream_png_directory(engine, frames):
    from edgeflow.runtime.pipeline import STAGES, Stats

    d, imgs = frames
    results = list(engine.stream(f"file://{d}"))
    assert [r.index for r in results] == [0, 1, 2, 3]
    stats = Stats()
    for i, r in enumerate(results):
        assert set(r.timings) == set(STAGES) and all(v >= 0 for v in r.timings.values())
        assert r.network_fps > 0 and r.pipeline_fps > 0
        np.testing.assert_array_equal(r.frame, imgs[i + 1])
        np.testing.assert_allclose(r.flow, engine(imgs[i], imgs[i + 1]), atol=1e-4)
        stats.add(r)
    s = stats.summary()
    assert s["network_fps"] > 0 and s["pipeline_fps"] > 0 and s["network"] > 0


def test_stream_mp4_and_max_frames(engine, frames, tmp_path):
    _, imgs = frames
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (100, 72))
    for img in imgs * 2:
        writer.write(img)
    writer.release()
    results = list(engine.stream(f"file://{clip}"))
    assert len(results) == 9
    assert all(r.flow.shape == (72, 100, 2) and r.frame.shape == (72, 100, 3) for r in results)
    assert len(list(engine.stream(str(clip), max_frames=3))) == 3


def test_stream_restarts_pairs_on_size_change(engine, frames):
    from edgeflow.runtime.pipeline import stream

    _, imgs = frames
    small = [cv2.resize(i, (50, 36)) for i in imgs[:2]]
    results = list(stream(engine, iter([imgs[0], imgs[1], small[0], small[1]])))
    assert [r.flow.shape for r in results] == [(72, 100, 2), (36, 50, 2)]


# -- CLI ------------------------------------------------------------------------------------------

def test_cli_run_writes_png_and_flo(package, frames, tmp_path, capsys):
    from edgeflow import read_flow
    from edgeflow.cli import main

    d, imgs = frames
    out = tmp_path / "out" / "flows"
    assert main(["run", str(package), str(d), "--output", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"flow_{i:05d}.{ext}" for i in range(4) for ext in ("flo", "png")]
    flow = read_flow(out / "flow_00000.flo")
    assert flow.shape == (72, 100, 2)
    assert cv2.imread(str(out / "flow_00000.png")).shape == (72, 100, 3)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "4 flow fields" in line and "pipeline" in line and "network" in line and "fps" in line


def test_cli_run_video_output(package, frames, tmp_path, capsys):
    from edgeflow.cli import main

    d, _ = frames
    video = tmp_path / "flow.mp4"
    assert main(["run", str(package), f"file://{d}/*.png", "--output", f"file://{video}", "--max-frames", "2"]) == 0
    assert count_video_frames(video) == 2
    assert not list(tmp_path.glob(".*tmp*"))


def test_cli_run_errors(package, tmp_path, capsys):
    from edgeflow.cli import main

    manifest, files = read_tar(package)
    bad = write_tar(tmp_path / "v9.tar", dict(manifest, format_version=9), files)
    assert main(["run", str(bad), str(tmp_path)]) == PackageError.exit_code
    err = capsys.readouterr().err.strip()
    assert err == (f"Error: {bad}: unknown package format version 9 (this runtime reads 2; "
                   f"recompile it with this edgeflow)")
    assert main(["run", str(package), "ftp://example.com/x"]) == InputError.exit_code
    assert "choices: csi://, v4l2://, rtsp://, http://, https://, file://" in capsys.readouterr().err


# -- threads --------------------------------------------------------------------------------------

def _ticks_per_thread() -> dict[str, int]:
    """CPU ticks (user + system) of each OS thread of this process, from /proc."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out[tid] = int(fields[11]) + int(fields[12])
    return out


def _busy_threads(engine, x1, x2, seconds: float = 1.0) -> int:
    """How many OS threads did a real share (over 20 %) of the work of calling the engine, counted
    once every pool that ran before (other engines, earlier tests) has stopped spinning."""
    import time

    from edgeflow.benchmark import wait_idle

    wait_idle()
    before, t0 = _ticks_per_thread(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine.run_tensor(x1, x2)
    used = [t - before.get(tid, 0) for tid, t in _ticks_per_thread().items()]
    return sum(u > 0.2 * max(used) for u in used)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux /proc and two CPUs")
def test_engine_threads_are_the_threads_that_run(package, rng):
    """threads=N runs the network on N OS threads, counted from /proc, whatever TVM's pool in
    the calling thread looked like before (here: created first with a single thread)."""
    import tvm_ffi

    from edgeflow.runtime import load

    tvm_ffi.get_global_func("runtime.config_threadpool")(-3, 1, ["0"])  # this thread's pool: one thread
    img1, img2 = random_pair(rng, H, W)
    one, two = load(package, threads=1), load(package, threads=2)
    assert (one.threads, two.threads) == (1, 2)
    x1, x2 = two.prepare(img1), two.prepare(img2)
    # `one` first: after a call, TVM's idle workers spin for a while and would count here
    assert _busy_threads(one, x1, x2) == 1
    assert _busy_threads(two, x1, x2) == 2
    np.testing.assert_allclose(one.run_tensor(x1, x2), two.run_tensor(x1, x2), atol=1e-4)
    default = load(package)
    from edgeflow.runtime.threads import physical_cores

    assert default.threads == physical_cores() >= 1
    with pytest.raises(InputError, match="threads=0: expected a positive integer"):
        load(package, threads=0)
    for e in (one, two, default):
        e.close()
    with pytest.raises(InputError, match="this engine was closed"):
        one.run_tensor(x1, x2)
