"""Package integrity: the manifest digest, signatures and trust, and what the reader refuses.

The packages here hold a real shared library whose constructor writes a marker file when the
library is loaded, so "nothing was loaded" is observed, not assumed. No TVM compile is needed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from edgeflow.errors import PackageError

HEADER = ("manifest.json", "manifest.sha256", "manifest.sig")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGEFLOW_TRUSTED_KEYS", raising=False)
    return tmp_path / "cache" / "packages"


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    """The file the planted library's constructor creates when loaded ($EDGEFLOW_TEST_MARKER)."""
    path = tmp_path / "library-was-loaded"
    monkeypatch.setenv("EDGEFLOW_TEST_MARKER", str(path))
    return path


@pytest.fixture(scope="module")
def planted_lib(tmp_path_factory) -> bytes:
    """A shared library that creates $EDGEFLOW_TEST_MARKER when loaded and is not a TVM module."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is absent")
    d = tmp_path_factory.mktemp("planted")
    (d / "p.c").write_text('#include <stdio.h>\n#include <stdlib.h>\n'
                           '__attribute__((constructor)) static void planted(void) {\n'
                           '  const char *p = getenv("EDGEFLOW_TEST_MARKER");\n'
                           '  if (p) { FILE *f = fopen(p, "w"); if (f) fclose(f); } }\n')
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(d / "p.so"), str(d / "p.c")], check=True)
    return (d / "p.so").read_bytes()


def manifest() -> dict:
    return {"model": {"name": "flownet2-s", "stages": "s", "width": 0.375}, "precision": "fp32",
            "input": {"height": 64, "width": 128, "dtype": "float32"}, "output": {"dtype": "float32"},
            "pruning": {"ratio": 0.0}, "quantization": None, "versions": {}, "accuracy": {"epe_vs_torch": 0.0},
            "target": {"name": "host", "kind": "cpu", "machine": platform.machine(), "host_triple": None},
            "params": {"order": []}}


def files(lib: bytes = b"\x7fELF original") -> dict[str, bytes]:
    return {"lib/model.so": lib, "params.npz": b"params"}


def write(path: Path, signing_key=None, lib: bytes = b"\x7fELF original") -> Path:
    from edgeflow.runtime.format import write_package

    write_package(path, manifest(), files(lib), signing_key=signing_key)
    return path


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def retar(path: Path, entries: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """A tar of `entries` in this order (and symlinks `links`: name -> target), written here."""
    with tarfile.open(path, "w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def forge(original: Path, out: Path, lib: bytes, *, redigest: bool) -> Path:
    """`original` with its library replaced and the manifest's sha256 of it rewritten; with
    `redigest` manifest.sha256 rewritten too (the forger's best effort without the key)."""
    entries = members(original)
    m = json.loads(entries["manifest.json"])
    m["files"]["lib/model.so"] = hashlib.sha256(lib).hexdigest()
    body = json.dumps(m, indent=1, sort_keys=True).encode()
    entries.update({"manifest.json": body, "lib/model.so": lib})
    if redigest:
        entries["manifest.sha256"] = hashlib.sha256(body).hexdigest().encode()
    return retar(out, entries)


@pytest.fixture
def keys(tmp_path):
    from edgeflow.runtime.signing import keygen

    mine = keygen(tmp_path / "keys" / "mine")
    other = keygen(tmp_path / "keys" / "other")
    return {"mine": mine, "other": other}


def refused(path: Path, match: str, **kw):
    from edgeflow.runtime import load

    with pytest.raises(PackageError, match=match) as info:
        load(path, **kw)
    assert "\n" not in str(info.value)
    return info.value


def assert_cli_refuses(capsys, path: Path, data: Path, match: str, trust: list[Path] = ()) -> None:
    """`edgeflow run`, `eval` and `serve` refuse with one line and the package exit code."""
    import re

    from edgeflow.cli import main

    extra = [a for k in trust for a in ("--trust", str(k))]
    for argv in (["run", str(path), str(data), *extra], ["eval", str(path), "--data", str(data), *extra],
                 ["serve", str(path), "--source", str(data), "--port", "0", *extra]):
        capsys.readouterr()
        assert main(argv) == PackageError.exit_code, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("Error: ") and "Traceback" not in err
        assert re.search(match, err), err


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """One FlyingChairs-style pair (images and flow), enough for `run` and `eval` to reach the package."""
    import cv2
    import numpy as np

    from edgeflow import write_flow

    d = tmp_path / "frames"
    d.mkdir()
    img = (np.arange(64 * 128 * 3) % 251).astype(np.uint8).reshape(64, 128, 3)
    cv2.imwrite(str(d / "00001_img1.png"), img)
    cv2.imwrite(str(d / "00001_img2.png"), img)
    write_flow(d / "00001_flow.flo", np.zeros((64, 128, 2), np.float32))
    return d


# -- the digest ------------------------------------------------------------------------------------


def test_rehashed_forgery_is_refused_before_anything_loads(tmp_path, planted_lib, marker, cache, capsys, data_dir):
    good = write(tmp_path / "good.tar")
    forged = forge(good, tmp_path / "forged.tar", planted_lib, redigest=False)
    refused(forged, "tampered package: manifest.json does not match manifest.sha256")
    assert_cli_refuses(capsys, forged, data_dir, "manifest.json does not match manifest.sha256")
    assert not marker.exists() and not (cache.exists() and any(cache.iterdir()))


def test_correctly_hashed_foreign_library_gives_one_line(tmp_path, planted_lib, marker, capsys, data_dir):
    """The control: the same library in a consistent unsigned package IS loaded (so the test
    above can fail), and what TVM says about it becomes one line."""
    from edgeflow.cli import main

    pkg = write(tmp_path / "consistent.tar", lib=planted_lib)
    err = refused(pkg, "the TVM runtime cannot load its library")
    assert marker.exists(), "the library should have been loaded"
    assert len(str(err)) < 400
    assert main(["run", str(pkg), str(data_dir)]) == PackageError.exit_code
    out = capsys.readouterr().err
    assert len(out.strip().splitlines()) == 1 and "cannot load its library" in out


def test_non_canonical_manifest_is_refused(tmp_path):
    entries = members(write(tmp_path / "good.tar"))
    body = json.dumps(json.loads(entries["manifest.json"])).encode()  # same content, other bytes
    entries.update({"manifest.json": body, "manifest.sha256": hashlib.sha256(body).hexdigest().encode()})
    refused(retar(tmp_path / "loose.tar", entries), "manifest.json is not in canonical form")


def test_missing_digest_is_refused(tmp_path):
    entries = members(write(tmp_path / "good.tar"))
    del entries["manifest.sha256"]
    refused(retar(tmp_path / "nodigest.tar", entries), r"not an edgeflow package of format 2 \(no manifest.sha256\)")


# -- signatures and trust ---------------------------------------------------------------------------


def test_signed_package_verifies_and_names_its_key(tmp_path, keys):
    from edgeflow.runtime.format import read_package

    private, public, kid = keys["mine"]
    pkg = write(tmp_path / "signed.tar", signing_key=private)
    assert read_package(pkg, check_target=False).signer == kid
    assert read_package(pkg, check_target=False, trusted_keys=[public]).signer == kid
    assert read_package(pkg, check_target=False, trusted_keys=public.read_bytes()).signer == kid
    sig = json.loads(members(pkg)["manifest.sig"])
    # the signature is Ed25519 over manifest.json's bytes, checked here with cryptography directly
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    load_pem_public_key(public.read_bytes()).verify(base64.b64decode(sig["signature"]), members(pkg)["manifest.json"])
    assert sig["key_id"] == kid == hashlib.sha256(base64.b64decode(sig["public_key"])).hexdigest()[:16]


def test_forgery_of_a_signed_package_is_refused(tmp_path, keys, planted_lib, marker, capsys, data_dir):
    private, public, kid = keys["mine"]
    good = write(tmp_path / "signed.tar", signing_key=private)
    forged = forge(good, tmp_path / "forged.tar", planted_lib, redigest=True)
    refused(forged, f"tampered package: its signature \\(key {kid}\\) does not verify")  # even without trust
    assert_cli_refuses(capsys, forged, data_dir, "does not verify", trust=[public])
    assert not marker.exists()


def test_trust_refuses_unsigned_and_foreign_packages(tmp_path, keys, planted_lib, marker, capsys, data_dir,
                                                     monkeypatch):
    _, public, _ = keys["mine"]
    other_private, _, other_kid = keys["other"]
    unsigned = forge(write(tmp_path / "u.tar"), tmp_path / "unsigned.tar", planted_lib, redigest=True)
    foreign = write(tmp_path / "foreign.tar", signing_key=other_private, lib=planted_lib)
    refused(unsigned, "package is not signed and trusted keys are configured", trusted_keys=[public])
    refused(foreign, f"signed by key {other_kid}, which is not trusted", trusted_keys=[public])
    assert_cli_refuses(capsys, unsigned, data_dir, "not signed and trusted keys are configured", trust=[public])
    assert_cli_refuses(capsys, foreign, data_dir, "which is not trusted", trust=[public])
    monkeypatch.setenv("EDGEFLOW_TRUSTED_KEYS", str(public))  # trust configured for the whole device
    refused(unsigned, "not signed and trusted keys are configured")
    refused(foreign, "which is not trusted")
    assert not marker.exists()


def test_bad_keys_are_input_errors(tmp_path, keys):
    from edgeflow.errors import InputError
    from edgeflow.runtime.signing import keygen, load_private_key, trusted_keys_from

    private, public, _ = keys["mine"]
    with pytest.raises(InputError, match="not a readable PEM public key"):
        trusted_keys_from([private])
    with pytest.raises(InputError, match="not a readable unencrypted PEM private key"):
        load_private_key(public)
    with pytest.raises(InputError, match="exists"):
        keygen(private)
    assert oct(private.stat().st_mode & 0o777) == "0o600"


def test_keygen_and_inspect_cli(tmp_path, keys, capsys):
    from edgeflow.cli import main

    key = tmp_path / "k"
    assert main(["keygen", str(key)]) == 0
    out = capsys.readouterr().out
    kid = out.split()[1].rstrip(":")
    assert key.is_file() and Path(f"{key}.pub").is_file() and len(kid) == 16
    assert main(["keygen", str(key)]) != 0
    assert "exists" in capsys.readouterr().err
    from edgeflow.runtime.format import write_package
    from edgeflow.runtime.signing import load_private_key

    write_package(tmp_path / "s.tar", manifest(), files(), signing_key=load_private_key(key))
    assert main(["inspect", str(tmp_path / "s.tar")]) == 0
    text = capsys.readouterr().out
    assert f"signed by key {kid}" in text
    write(tmp_path / "u.tar")
    assert main(["inspect", str(tmp_path / "u.tar"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["signer"] is None
    assert report["manifest_sha256"] == hashlib.sha256(members(tmp_path / "u.tar")["manifest.json"]).hexdigest()


# -- malformed tars ---------------------------------------------------------------------------------


def test_truncated_tar_is_refused(tmp_path, cache):
    good = write(tmp_path / "good.tar", lib=os.urandom(20000))
    data = good.read_bytes()
    for cut in (len(data) // 2, 700):
        bad = tmp_path / f"cut{cut}.tar"
        bad.write_bytes(data[:cut])
        err = refused(bad, "cut")
        assert any(s in str(err) for s in ("not a readable package tar", "does not match", "truncated")), err
    assert not (cache.exists() and any(p.name[0] != "." for p in cache.iterdir()))


def test_manifest_path_outside_the_package_is_refused(tmp_path):
    entries = members(write(tmp_path / "good.tar"))
    m = json.loads(entries["manifest.json"])
    m["files"]["../x"] = hashlib.sha256(b"x").hexdigest()
    body = json.dumps(m, indent=1, sort_keys=True).encode()
    entries.update({"manifest.json": body, "manifest.sha256": hashlib.sha256(body).hexdigest().encode()})
    refused(retar(tmp_path / "escape.tar", entries),
            r"manifest file '\.\./x' is not a relative path inside the package")
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


def test_symlink_member_is_refused(tmp_path):
    entries = members(write(tmp_path / "good.tar"))
    bad = retar(tmp_path / "link.tar", entries, links={"lib/evil.so": "/etc/passwd"})
    refused(bad, "member 'lib/evil.so' is not a regular file")


def test_header_names_are_reserved(tmp_path):
    from edgeflow.errors import InputError
    from edgeflow.runtime.format import write_package

    with pytest.raises(InputError, match="not a relative path"):
        write_package(tmp_path / "x.tar", manifest(), {"../x": b""})
    entries = members(write(tmp_path / "good.tar"))
    m = json.loads(entries["manifest.json"])
    m["files"]["manifest.sig"] = hashlib.sha256(b"").hexdigest()
    body = json.dumps(m, indent=1, sort_keys=True).encode()
    entries.update({"manifest.json": body, "manifest.sha256": hashlib.sha256(body).hexdigest().encode(),
                    "manifest.sig": b""})
    refused(retar(tmp_path / "reserved.tar", entries), "malformed|reserves")
