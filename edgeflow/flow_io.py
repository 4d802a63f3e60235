"""Optical-flow files by suffix: Middlebury `.flo`, KITTI 16-bit `.png`, numpy `.npy`.

Flow is float32 HxWx2 in pixels (u right, v down). Unknown vectors: `.flo` files mark them with
values >= 1e9 (Middlebury convention) and are returned as stored; KITTI PNGs carry a valid bit and
their invalid pixels are returned as NaN. `read_flow_valid` gives the flow with a bool HxW mask.
Writes are atomic: a temporary file in the target directory, then `os.replace`.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np

from edgeflow.errors import InputError

FLO_MAGIC = 202021.25
UNKNOWN = 1e9  # |u| or |v| at or above this means "no ground truth here"
MAX_SIDE = 1 << 15  # larger .flo dimensions mean a corrupt header
SUFFIXES = (".flo", ".png", ".npy")


def read_flow(path: str | os.PathLike) -> np.ndarray:
    """Flow float32 HxWx2 (pixels) from a .flo, KITTI .png or .npy file."""
    return read_flow_valid(path)[0]


def read_flow_valid(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(flow float32 HxWx2, valid bool HxW); KITTI invalid pixels become NaN in the flow."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise InputError(f"{path}: flow file does not exist")
    if suffix == ".png":
        return _read_kitti(path)
    flow = _read_flo(path) if suffix == ".flo" else _read_npy(path)
    return flow, known(flow)


def write_flow(path: str | os.PathLike, flow: np.ndarray) -> None:
    """Write flow HxWx2 (pixels) as .flo, KITTI .png (NaN or >= 1e9 -> invalid) or .npy."""
    path = Path(path)
    suffix = _suffix(path)
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2 or 0 in flow.shape or flow.dtype.kind not in "fiu":
        raise InputError(f"{path}: expected a numeric HxWx2 flow array, got {flow.dtype} {flow.shape}")
    flow = flow.astype(np.float32)
    if suffix == ".flo":
        h, w = flow.shape[:2]
        data = (np.array([FLO_MAGIC], "<f4").tobytes() + np.array([w, h], "<i4").tobytes()
                + flow.astype("<f4").tobytes())
    elif suffix == ".png":
        data = _encode_kitti(path, flow)
    else:
        buf = io.BytesIO()
        np.save(buf, flow)
        data = buf.getvalue()
    write_atomic(path, data)


def known(flow: np.ndarray) -> np.ndarray:
    """bool HxW: both components finite and below 1e9 in magnitude."""
    with np.errstate(invalid="ignore"):
        return np.all(np.isfinite(flow) & (np.abs(flow) < UNKNOWN), axis=-1)


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unknown flow file suffix {path.suffix!r}; choices: {', '.join(SUFFIXES)}")
    return suffix


def _read_flo(path: Path) -> np.ndarray:
    data = path.read_bytes()
    if len(data) < 12:
        raise InputError(f"{path}: truncated .flo header ({len(data)} bytes, expected at least 12)")
    magic = np.frombuffer(data, "<f4", 1)[0]
    if magic != np.float32(FLO_MAGIC):
        raise InputError(f"{path}: not a .flo file (magic {magic!r}, expected {FLO_MAGIC})")
    w, h = (int(x) for x in np.frombuffer(data, "<i4", 2, 4))
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise InputError(f"{path}: absurd .flo dimensions {w}x{h} (expected 1..{MAX_SIDE} per side)")
    expected = 12 + w * h * 8
    if len(data) != expected:
        raise InputError(f"{path}: .flo of {w}x{h} should be {expected} bytes, file has {len(data)}"
                         + (" (truncated)" if len(data) < expected else ""))
    return np.frombuffer(data, "<f4", w * h * 2, 12).reshape(h, w, 2).astype(np.float32)


def _read_npy(path: Path) -> np.ndarray:
    try:
        flow = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy file ({e})") from None
    if flow.ndim != 3 or flow.shape[2] != 2 or flow.dtype.kind not in "fiu":
        raise InputError(f"{path}: expected a numeric HxWx2 flow array, got {flow.dtype} {flow.shape}")
    return flow.astype(np.float32)


def _read_kitti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype != np.uint16 or img.ndim != 3 or img.shape[2] != 3:
        got = "unreadable" if img is None else f"{img.dtype} {img.shape}"
        raise InputError(f"{path}: expected a 16-bit 3-channel KITTI flow PNG, got {got}")
    valid = img[..., 0] > 0  # OpenCV order B,G,R = valid, v, u
    flow = (img[..., 2:0:-1].astype(np.float32) - 2**15) / 64.0
    flow[~valid] = np.nan
    return flow, valid


def _encode_kitti(path: Path, flow: np.ndarray) -> bytes:
    import cv2

    valid = known(flow)
    q = np.zeros(flow.shape[:2] + (3,), np.uint16)
    with np.errstate(invalid="ignore"):
        uv = np.clip(np.rint(flow * 64.0 + 2**15), 0, 2**16 - 1)
    q[..., 2] = np.where(valid, uv[..., 0], 0)
    q[..., 1] = np.where(valid, uv[..., 1], 0)
    q[..., 0] = valid
    ok, buf = cv2.imencode(".png", q)
    if not ok:
        raise InputError(f"{path}: OpenCV could not encode the KITTI PNG")
    return buf.tobytes()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same directory and os.replace: a
    reader never sees a partial file."""
    if not path.parent.is_dir():
        raise InputError(f"{path}: directory {str(path.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
