"""The package format, owned here once: version, schema, manifest, writer and verifying reader.

A package is an uncompressed `.tar` whose first members are

    manifest.json       the manifest, canonical JSON (`canonical_manifest`): format version, model,
                        input/output, precision, pruning, quantization, target, versions, params
                        order, accuracy at compile time, kernels, and the sha256 of every other file
    manifest.sha256     hex sha256 of manifest.json's bytes
    manifest.sig        optional: JSON {"algorithm": "ed25519", "key_id", "public_key", "signature"}
                        (base64) over manifest.json's bytes

followed by the files the manifest lists:

    lib/model.so        TVM VM executable (host code; aarch64 for Jetson boards)
    lib/kernels.cubin   CUDA packages: device code compiled ahead of time for the board's arch
    lib/kernels.json    CUDA packages: TVM function info of the kernels in the cubin
    params.npz          parameters keyed by manifest["params"]["order"]

`read_package` checks, before anything in the package is used: that the tar is readable and holds
regular files only under safe relative names; that manifest.json is canonical and matches
manifest.sha256; that a signature, where present, verifies, and, with trusted keys configured,
that there is one by a trusted key; the format version and schema; that the files present are
exactly those listed; that this machine can run the target. Files are then extracted into a cache
directory keyed by the tar's sha256, hashed while extracting, and the directory appears only once
every hash matched (a cached directory is re-hashed on every read). Without trusted keys the
digests catch corruption and careless edits, not a forger who rewrites them: configure trust
(`trusted_keys=`, $EDGEFLOW_TRUSTED_KEYS) where packages cross untrusted hands.

Imports only the standard library (plus `cryptography` for signatures and the TVM runtime to look
for a CUDA device), so the device side reads packages without the compiler.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import platform
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgeflow.errors import InputError, PackageError, one_line

FORMAT_VERSION = 2
MANIFEST, DIGEST, SIGNATURE = "manifest.json", "manifest.sha256", "manifest.sig"
HEADER = (MANIFEST, DIGEST, SIGNATURE)  # members that describe the package rather than belong to it
REQUIRED = ("format_version", "model", "input", "output", "precision", "pruning", "quantization", "target",
            "versions", "params", "accuracy", "files")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class VerifiedPackage:
    """A package that passed `read_package`: its manifest, the directory of its extracted files,
    the sha256 of its manifest and the key id of its signer (None when unsigned)."""

    manifest: dict
    directory: Path
    manifest_sha256: str
    signer: str | None


def build_manifest(*, model: dict, input_size: tuple[int, int], precision: str, board, versions: dict,
                   param_names: list[str], accuracy: dict, kernels: list, compile_seconds: float,
                   pruning: dict | None = None, quantization: dict | None = None, cost: dict | None = None,
                   tuning: dict | None = None) -> dict:
    """The manifest of a package (without `files` and `format_version`, which `write_package` adds).

    model: {"name", "stages", "width", "weights", "weights_sha256"}; input_size: (H, W) pixels;
    board: an `edgeflow.targets.Board`; accuracy: {"epe_vs_torch" (px), "frames", "tolerance" (px),
    "measured_on", "measured_with"}; kernels: per CUDA kernel resources (empty for CPU targets);
    pruning: {"ratio": 0.0} or the pruning report; cost: {"parameters", "macs", "input_size"};
    tuning: None (hand schedules only) or the tuning records applied (`TuningDatabase.manifest_entry`:
    database target, per function the workload hash and tuned/hand ms).
    """
    h, w = input_size
    return {
        "model": model,
        "input": {"height": h, "width": w, "dtype": "float32", "layout": "NCHW", "color": "RGB", "range": [0, 1]},
        "output": {"dtype": "float32", "units": "pixels"},
        "precision": precision,
        "pruning": pruning or {"ratio": 0.0},
        "cost": cost,
        "quantization": quantization,
        "target": {"name": board.name, "kind": board.kind, "tvm_target": board.tvm_target_json(),
                   "cuda_arch": board.cuda_arch, "cuda_version": board.cuda_version,
                   "host_triple": board.host_triple, "machine": platform.machine()},
        "versions": versions,
        "params": {"order": list(param_names)},
        "accuracy": accuracy,
        "kernels": kernels,
        "compile_seconds": round(compile_seconds, 1),
        "tuning": tuning,
    }


def canonical_manifest(manifest: dict) -> bytes:
    """The one byte form of a manifest: sorted keys, ASCII, one-space indent, no NaN."""
    return json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=True, allow_nan=False).encode()


def params_npz(names: list[str], arrays: list) -> bytes:
    """The parameters as .npz bytes, keyed by name."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **dict(zip(names, arrays)))
    return buf.getvalue()


def write_package(out: str | os.PathLike, manifest: dict, files: dict[str, bytes], *,
                  signing_key=None) -> dict:
    """Write `files` ({relative path: bytes}) and `manifest` (completed with the format version
    and their sha256) to the tar `out`, atomically: a partial package never exists under `out`.
    `signing_key`: an Ed25519 private key (or the path of its PEM file) that signs the manifest.
    Returns the manifest as written."""
    for name in files:
        _check_name(name, f"files: {name!r}", InputError)
    manifest = dict(manifest, format_version=FORMAT_VERSION,
                    files={name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())})
    body = canonical_manifest(manifest)
    entries = {MANIFEST: body, DIGEST: hashlib.sha256(body).hexdigest().encode() + b"\n"}
    if signing_key is not None:
        from edgeflow.runtime import signing

        if not hasattr(signing_key, "sign"):
            signing_key = signing.load_private_key(signing_key)
        signature, public = signing.sign(signing_key, body)
        entries[SIGNATURE] = json.dumps({"algorithm": "ed25519", "key_id": signing.key_id(public),
                                         "public_key": base64.b64encode(public).decode(),
                                         "signature": base64.b64encode(signature).decode()}).encode()
    entries.update(files)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def cache_root() -> Path:
    """Where packages are extracted: $EDGEFLOW_CACHE/packages, else ~/.cache/edgeflow/packages."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    base = os.environ.get("EDGEFLOW_CACHE") or xdg / "edgeflow"
    return Path(base) / "packages"


def read_package(path: str | os.PathLike, *, device: str | None = None, check_target: bool = True,
                 trusted_keys=None) -> VerifiedPackage:
    """The package at `path`, verified (see the module docstring for what and in which order).

    trusted_keys: Ed25519 public keys (PEM file paths, PEM bytes or key objects); the package must
    be signed by one of them. None: the keys named in $EDGEFLOW_TRUSTED_KEYS, or no trust check
    where that is unset (a signature present is still verified). Raises PackageError (one line)
    for anything that fails, before any file of the package is extracted or loaded.
    """
    from edgeflow.runtime.signing import trusted_keys_from

    trusted = trusted_keys_from(trusted_keys)
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"{path}: no such package file")
    try:
        tar_digest = _sha256_file(path)
        with tarfile.open(path, "r:") as tar:
            members = _regular_members(tar, path)
            manifest, manifest_sha256, signer = _read_header(tar, members, path, trusted)
            _check_names(manifest, members, path)
            if check_target:
                check_runnable(manifest, device)
            directory = _cached(tar_digest, manifest) or _extract(tar, members, tar_digest, manifest, path)
    except (tarfile.TarError, EOFError) as e:
        raise PackageError(f"{path}: not a readable package tar ({one_line(e)})") from None
    except OSError as e:
        raise PackageError(f"{path}: cannot read it or extract it into {cache_root()} ({one_line(e)})") from None
    return VerifiedPackage(manifest, directory, manifest_sha256, signer)


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
    _check_cpu_features(manifest)


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


def _target_arch(target: dict) -> str:
    from edgeflow.targets import canonical_arch

    triple = target.get("host_triple")
    return canonical_arch(triple.split("-")[0] if triple else str(target.get("machine") or "unknown"))


def _check_host(target: dict) -> None:
    from edgeflow.targets import machine_arch

    here, there = machine_arch(), _target_arch(target)
    if there == here:
        return
    if target.get("host_triple"):
        raise PackageError(f"package is for {target['host_triple']}; this machine is {here}")
    raise PackageError(f"package was built for the CPU of the compiling machine ({there}); this machine is {here}")


# Integer dot products in the int8 CPU kernels (the manifest's quantization.kernels counts) -> the
# Linux /proc/cpuinfo flag of the CPU feature they need.
DOT_FLAGS = {"sdot": "asimddp", "udot": "asimddp", "usdot": "i8mm", "vpdpbusd": "avx512_vnni"}


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags as Linux lists them in /proc/cpuinfo ("flags" on x86, "Features"
    on ARM); None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def _check_cpu_features(manifest: dict) -> None:
    kernels = (manifest.get("quantization") or {}).get("kernels") or []
    needed = {DOT_FLAGS[op]: op for k in kernels for op, n in (k.get("instructions") or {}).items()
              if n and op in DOT_FLAGS}
    flags = cpu_flags() if needed else None
    missing = sorted(f for f in needed if flags is not None and f not in flags)
    if missing:
        raise PackageError(f"package's int8 kernels use {', '.join(needed[f] for f in missing)}, which this CPU "
                           f"lacks ({', '.join(missing)} not in /proc/cpuinfo); compile it as fp32 or fp16")


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


def _check_name(name: str, what: str, error=PackageError) -> str:
    """`name` as a normalised relative POSIX path; `error` if absolute, with `..`, or a drive."""
    parts = PurePosixPath(name).parts
    if not name or name.startswith(("/", "\\")) or ".." in parts or "\\" in name or (parts and ":" in parts[0]):
        raise error(f"{what} is not a relative path inside the package")
    return str(PurePosixPath(*[p for p in parts if p != "."]))


def _regular_members(tar: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    """Regular files by normalised relative name; directories skipped; anything unsafe refused."""
    members = {}
    for m in tar.getmembers():
        rel = _check_name(m.name, f"{path}: member {m.name!r}")
        if m.isdir():
            continue
        if not m.isfile():
            raise PackageError(f"{path}: member {m.name!r} is not a regular file (links are refused)")
        if rel in members:
            raise PackageError(f"{path}: member {rel!r} appears twice in package tar")
        members[rel] = m
    return members


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int = 16 << 20) -> bytes:
    if member.size > limit:
        raise PackageError(f"{member.name} is {member.size} bytes; a package header file is at most {limit}")
    data = tar.extractfile(member).read()
    if len(data) != member.size:
        raise PackageError(f"{member.name} is truncated")
    return data


def _read_header(tar, members: dict, path: Path, trusted: dict | None) -> tuple[dict, str, str | None]:
    """(manifest, its sha256, signer key id) once the digest, the signature and the schema hold."""
    for name in (MANIFEST, DIGEST):
        if name not in members:
            raise PackageError(f"{path}: not an edgeflow package of format {FORMAT_VERSION} (no {name})")
    body = _read_member(tar, members[MANIFEST])
    digest = hashlib.sha256(body).hexdigest()
    if _read_member(tar, members[DIGEST]).decode("ascii", "replace").strip() != digest:
        raise PackageError(f"{path}: tampered package: {MANIFEST} does not match {DIGEST}")
    signer = _check_signature(tar, members, body, path, trusted)
    try:
        manifest = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PackageError(f"{path}: {MANIFEST} is not valid JSON ({one_line(e)})") from None
    if not isinstance(manifest, dict):
        raise PackageError(f"{path}: {MANIFEST} is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise PackageError(f"{path}: unknown package format version {version} (this runtime reads "
                           f"{FORMAT_VERSION}; recompile it with this edgeflow)")
    if canonical_manifest(manifest) != body:
        raise PackageError(f"{path}: tampered package: {MANIFEST} is not in canonical form")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise PackageError(f"{path}: {MANIFEST} lacks {', '.join(missing)}")
    if not isinstance(manifest["files"], dict) or not isinstance(manifest["target"], dict):
        raise PackageError(f"{path}: {MANIFEST} 'files' and 'target' must be objects")
    for name in manifest["files"]:
        if _check_name(str(name), f"{path}: manifest file {name!r}") in HEADER:
            raise PackageError(f"{path}: manifest lists {name!r}, a name the format reserves")
    return manifest, digest, signer


def _check_signature(tar, members: dict, body: bytes, path: Path, trusted: dict | None) -> str | None:
    """The signer's key id (None if unsigned); PackageError for a bad or untrusted signature."""
    from edgeflow.runtime import signing

    if SIGNATURE not in members:
        if trusted is not None:
            raise PackageError(f"{path}: package is not signed and trusted keys are configured")
        return None
    try:
        sig = json.loads(_read_member(tar, members[SIGNATURE]).decode("utf-8"))
        public, signature = base64.b64decode(sig["public_key"]), base64.b64decode(sig["signature"])
        algorithm = sig.get("algorithm")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise PackageError(f"{path}: {SIGNATURE} is malformed ({one_line(e)})") from None
    if algorithm != "ed25519":
        raise PackageError(f"{path}: {SIGNATURE} uses algorithm {algorithm!r}; this runtime verifies ed25519")
    kid = signing.key_id(public)
    if not signing.verify(public, signature, body):
        raise PackageError(f"{path}: tampered package: its signature (key {kid}) does not verify")
    if trusted is not None and kid not in trusted:
        raise PackageError(f"{path}: package is signed by key {kid}, which is not trusted "
                           f"(trusted: {', '.join(sorted(trusted))})")
    return kid


def _listed(manifest: dict) -> dict[str, str]:
    return {str(PurePosixPath(k)): str(v).lower() for k, v in manifest["files"].items()}


def _check_names(manifest: dict, members: dict, path: Path) -> None:
    listed, present = set(_listed(manifest)), set(members) - set(HEADER)
    if listed - present:
        raise PackageError(f"{path}: tampered package: {min(listed - present)} is listed in its manifest but missing")
    if present - listed:
        raise PackageError(f"{path}: tampered package: {min(present - listed)} is not listed in its manifest")


def _check_hashes(manifest: dict, hashes: dict[str, str], path: Path) -> None:
    for name, want in sorted(_listed(manifest).items()):
        if hashes.get(name) != want:
            raise PackageError(f"{path}: tampered package: sha256 of {name} does not match its manifest")


def _cached(digest: str, manifest: dict) -> Path | None:
    """The cache directory of this tar if it holds exactly the manifest's files, hashes included."""
    dest = cache_root() / digest
    if not (dest / MANIFEST).is_file():
        return None
    try:
        _check_hashes(manifest, {name: _sha256_file(dest / name) for name in _listed(manifest)}, dest)
    except (PackageError, OSError):  # damaged or partial: extract again
        shutil.rmtree(dest, ignore_errors=True)
        return None
    return dest


def _extract(tar: tarfile.TarFile, members: dict, digest: str, manifest: dict, path: Path) -> Path:
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
        _check_hashes(manifest, hashes, path)
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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
