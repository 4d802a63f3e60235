"""Read and verify a compiled package (`.tar`): manifest, hashes, format version, target.

A package holds `manifest.json`, `lib/model.so` (the TVM Relax VM executable), `params.npz` and,
for CUDA targets, `lib/kernels.cubin` + `lib/kernels.json`. `read_package` checks, in this order,
that the tar is readable (regular files only, no absolute or `..` paths) and has a manifest,
that the runtime knows its format version, that no file is missing or unlisted, that this
machine can run its target, and that every file's sha256 matches the manifest. Packages are
extracted once into a cache directory keyed by the tar's sha256 (hashed while extracting; a
cached directory is re-hashed on every read, so what is verified is what the Engine loads).
Imports only the standard library (and TVM, for CUDA packages, to look for a device).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from edgeflow.errors import PackageError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("format_version", "model", "input", "output", "precision", "target", "params", "files")
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}
_CHUNK = 1 << 20


def cache_root() -> Path:
    """Where packages are extracted: $EDGEFLOW_CACHE/packages, else ~/.cache/edgeflow/packages."""
    base = os.environ.get("EDGEFLOW_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeflow"
    return Path(base) / "packages"


def read_package(path: str | os.PathLike, *, device: str | None = None,
                 check_target: bool = True) -> tuple[dict, Path]:
    """(manifest, directory of the extracted files) of the package at `path`, verified.

    Raises PackageError (one line) for an unreadable tar, a missing or malformed manifest, an
    unknown format version, a missing or unlisted file, (with `check_target`) a target this
    machine (and `device`) cannot run, or a file whose sha256 differs from the manifest. The
    hashes are those of the extracted files the Engine loads, checked on every read.
    """
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"{path}: no such package file")
    try:
        digest = _sha256_file(path)
        with tarfile.open(path, "r:") as tar:
            members = _regular_members(tar, path)
            manifest = _read_manifest(tar, members, path)
            _check_names(manifest, members)
            if check_target:
                check_runnable(manifest, device)
            directory = _cached(digest, manifest) or _extract(tar, members, digest, manifest)
    except (tarfile.TarError, EOFError) as e:
        raise PackageError(f"{path}: not a readable package tar ({_one_line(e)})") from None
    except OSError as e:
        raise PackageError(f"{path}: cannot read it or extract it into {cache_root()} ({_one_line(e)})") from None
    return manifest, directory


def check_runnable(manifest: dict, device: str | None = None) -> None:
    """PackageError unless this machine (and `device`, "cpu" or "cuda[:N]") can run the target."""
    target = manifest["target"]
    kind = target.get("kind")
    if kind not in ("cpu", "cuda"):
        raise PackageError(f"package target kind {kind!r} is unknown (this runtime runs cpu and cuda)")
    dev_kind = None if device is None else str(device).split(":")[0]
    if dev_kind not in (None, "cpu", "cuda"):
        raise PackageError(f"unknown device {device!r}; choices: cpu, cuda, cuda:N")
    if dev_kind is not None and dev_kind != kind:
        raise PackageError(f"package targets {describe_target(target)}; it cannot run on device {device!r}")
    if kind == "cuda":
        _check_cuda(target, device_index(device))
    _check_host(target)


def describe_target(target: dict) -> str:
    """`jetson-orin-nano (cuda sm_87)` or `host (cpu x86_64)`."""
    if target.get("kind") == "cuda":
        return f"{target.get('name')} (cuda {target.get('cuda_arch')})"
    return f"{target.get('name')} (cpu {_target_arch(target)})"


def device_index(device: str | None) -> int:
    """N of "cuda:N" (0 for "cuda", "cpu" or None)."""
    _, _, index = str(device or "").partition(":")
    try:
        return int(index or 0)
    except ValueError:
        raise PackageError(f"unknown device {device!r}; choices: cpu, cuda, cuda:N") from None


def machine_arch() -> str:
    """This machine's CPU architecture with the names LLVM triples use (x86_64, aarch64)."""
    arch = platform.machine().lower()
    return _ARCH_ALIASES.get(arch, arch)


def _target_arch(target: dict) -> str:
    triple = target.get("host_triple")
    if triple:
        arch = triple.split("-")[0].lower()
    else:
        arch = str(target.get("machine") or "unknown").lower()
    return _ARCH_ALIASES.get(arch, arch)


def _check_host(target: dict) -> None:
    here, there = machine_arch(), _target_arch(target)
    if there == here:
        return
    if target.get("host_triple"):
        raise PackageError(f"package is for {target['host_triple']}; this machine is {here}")
    raise PackageError(f"package was built for the CPU of the compiling machine ({there}); this machine is {here}")


def _check_cuda(target: dict, index: int) -> None:
    try:
        import tvm.runtime
    except ImportError:
        raise PackageError(f"package targets {describe_target(target)}; the TVM runtime is not installed") from None
    dev = tvm.runtime.cuda(index)
    if not dev.exist:
        raise PackageError(f"package targets {describe_target(target)}; this machine has no CUDA device"
                           + (f" {index}" if index else ""))
    want = str(target.get("cuda_arch") or "")
    have = "sm_" + str(dev.compute_version).replace(".", "")
    if want and want != have:
        raise PackageError(f"package targets {describe_target(target)}; this GPU is {have}")


def _regular_members(tar: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    """Regular files by normalised relative name; directories skipped; anything unsafe refused."""
    members = {}
    for m in tar.getmembers():
        name = m.name
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise PackageError(f"{path}: unsafe member {name!r} in package tar")
        if m.isdir():
            continue
        if not m.isfile():
            raise PackageError(f"{path}: member {name!r} is not a regular file")
        rel = str(PurePosixPath(*[p for p in parts if p != "."]))
        if rel in members:
            raise PackageError(f"{path}: member {rel!r} appears twice in package tar")
        members[rel] = m
    return members


def _read_manifest(tar: tarfile.TarFile, members: dict, path: Path) -> dict:
    if MANIFEST not in members:
        raise PackageError(f"{path}: not a package (no {MANIFEST})")
    try:
        manifest = json.loads(tar.extractfile(members[MANIFEST]).read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PackageError(f"{path}: {MANIFEST} is not valid JSON ({_one_line(e)})") from None
    if not isinstance(manifest, dict):
        raise PackageError(f"{path}: {MANIFEST} is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise PackageError(f"unknown package format version {version} (this runtime reads {FORMAT_VERSION})")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise PackageError(f"{path}: {MANIFEST} lacks {', '.join(missing)}")
    if not isinstance(manifest["files"], dict) or not isinstance(manifest["target"], dict):
        raise PackageError(f"{path}: {MANIFEST} 'files' and 'target' must be objects")
    return manifest


def _listed(manifest: dict) -> dict[str, str]:
    return {str(PurePosixPath(k)): str(v).lower() for k, v in manifest["files"].items()}


def _check_names(manifest: dict, members: dict) -> None:
    listed, present = set(_listed(manifest)), set(members) - {MANIFEST}
    if listed - present:
        raise PackageError(f"tampered package: {min(listed - present)} is listed in its manifest but missing")
    if present - listed:
        raise PackageError(f"tampered package: {min(present - listed)} is not listed in its manifest")


def _check_hashes(manifest: dict, hashes: dict[str, str]) -> None:
    for name, want in sorted(_listed(manifest).items()):
        if hashes.get(name) != want:
            raise PackageError(f"tampered package: sha256 of {name} does not match its manifest")


def _cached(digest: str, manifest: dict) -> Path | None:
    """The cache directory of this tar if it holds exactly the manifest's files, hashes included."""
    dest = cache_root() / digest
    if not (dest / MANIFEST).is_file():
        return None
    try:
        _check_hashes(manifest, {name: _sha256_file(dest / name) for name in _listed(manifest)})
    except (PackageError, OSError):  # damaged or partial: extract again
        shutil.rmtree(dest, ignore_errors=True)
        return None
    return dest


def _extract(tar: tarfile.TarFile, members: dict, digest: str, manifest: dict) -> Path:
    """Extract into cache_root()/<sha256 of the tar>, hashing while writing; the directory
    appears (by rename) only once every hash has matched."""
    dest = cache_root() / digest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", dir=dest.parent))
    try:
        hashes = {}
        for name, m in members.items():
            out = tmp / name
            out.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with tar.extractfile(m) as src, open(out, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
            hashes[name] = h.hexdigest()
        _check_hashes(manifest, hashes)
        shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process extracted the same package meanwhile
            if not (dest / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256_stream(f)


def _sha256_stream(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
