"""The package writer: a `.tar` with manifest.json, the library, parameters and hashes.

Layout (read back by `edgeflow.runtime.package`):
    manifest.json       format version, model, input/output, precision, target, versions,
                        params order, sha256 of every other file, accuracy at compile time
    lib/model.so        TVM VM executable (host code; aarch64 for Jetson boards)
    lib/kernels.cubin   CUDA packages: device code compiled ahead of time for the board's arch
    lib/kernels.json    CUDA packages: TVM function info of the kernels in the cubin
    params.npz          parameters keyed by manifest["params"]["order"]
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

FORMAT_VERSION = 1


def write_package(out: str | os.PathLike, manifest: dict, files: dict[str, bytes]) -> Path:
    """Write `files` ({relative path: bytes}) and `manifest` (completed with their sha256) to
    the tar `out`, atomically: a partial package never exists under `out`."""
    out = Path(out)
    manifest = dict(manifest, format_version=FORMAT_VERSION,
                    files={name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())})
    entries = {"manifest.json": json.dumps(manifest, indent=1, sort_keys=True).encode(), **files}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    return out


def params_npz(names: list[str], arrays: list) -> bytes:
    """The parameters as .npz bytes, keyed by name."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **dict(zip(names, arrays)))
    return buf.getvalue()
