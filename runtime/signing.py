"""Ed25519 keys and signatures for packages (the `cryptography` package).

A key pair is two PEM files: `KEY` (PKCS#8 private key, mode 0600) and `KEY.pub` (the public key,
SubjectPublicKeyInfo). A key is named by its id: the first 16 hex digits of the sha256 of the raw
32-byte public key. `edgeflow.runtime.format` signs the canonical manifest bytes with a private
key and verifies them against the trusted public keys.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edgeflow.errors import InputError, MissingDependency

TRUST_ENV = "EDGEFLOW_TRUSTED_KEYS"  # public key files, separated by os.pathsep


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingDependency("package signatures need the `cryptography` package; "
                                "install it with `pip install cryptography`") from None
    return serialization, ed25519


def raw_public(public_key) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key) -> str:
    """16 hex digits naming an Ed25519 public key (or its 32 raw bytes)."""
    raw = public_key if isinstance(public_key, bytes) else raw_public(public_key)
    return hashlib.sha256(raw).hexdigest()[:16]


def keygen(path: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write a new key pair to `path` (private, 0600) and `path`.pub; returns (private path,
    public path, key id). InputError if either file exists and not `overwrite`."""
    serialization, ed25519 = _crypto()
    private, public = Path(path), Path(f"{path}.pub")
    for p in (private, public):
        if p.exists() and not overwrite:
            raise InputError(f"{p}: exists; choose another path or overwrite=True")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(private, pem, 0o600)
    _write_atomic(public, pub, 0o644)
    return private, public, key_id(key.public_key())


def load_private_key(path: str | os.PathLike):
    """The Ed25519 private key in the PEM file `path`; InputError if it is not one."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"{path}: not a readable unencrypted PEM private key ({_reason(e)})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InputError(f"{path}: not an Ed25519 private key (make one with `edgeflow keygen`)")
    return key


def load_public_key(key):
    """An Ed25519 public key from a PEM file path, PEM bytes, or a key object; InputError otherwise."""
    serialization, ed25519 = _crypto()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    source = "public key" if isinstance(key, bytes) else str(key)
    try:
        data = key if isinstance(key, bytes) else Path(key).read_bytes()
        public = serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"{source}: not a readable PEM public key ({_reason(e)})") from None
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise InputError(f"{source}: not an Ed25519 public key (`edgeflow keygen` writes KEY.pub)")
    return public


def trusted_keys_from(keys) -> dict[str, object] | None:
    """{key id: public key} of `keys` (paths, PEM bytes or key objects); with `keys` None, those of
    the files named in $EDGEFLOW_TRUSTED_KEYS. None when no trust is configured."""
    if keys is None:
        env = os.environ.get(TRUST_ENV, "")
        keys = [k for k in env.split(os.pathsep) if k] or None
        if keys is None:
            return None
    if isinstance(keys, (str, bytes, os.PathLike)):
        keys = [keys]
    loaded = [load_public_key(k) for k in keys]
    if not loaded:
        raise InputError("trusted_keys: an empty list trusts no package; pass None for no trust check")
    return {key_id(k): k for k in loaded}


def sign(private_key, data: bytes) -> tuple[bytes, bytes]:
    """(signature, raw public key) of `data` under `private_key`."""
    return private_key.sign(data), raw_public(private_key.public_key())


def verify(raw_public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when `signature` of `data` verifies under the raw 32-byte Ed25519 public key."""
    from cryptography.exceptions import InvalidSignature

    _, ed25519 = _crypto()
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(raw_public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _reason(e: Exception) -> str:
    return " ".join(str(e).split())[:120] or type(e).__name__
