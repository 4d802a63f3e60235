"""What a cubin really executes: its SASS, read with NVIDIA's `cuobjdump -sass` (+ `nvdisasm`).

`instruction_classes(cubin, arch)` counts, per kernel, the instructions that decide where the
arithmetic runs: tensor cores (HMMA fp16, IMMA int8), dp4a (IDP.4A), and the scalar/vector FMA
pipes (FFMA fp32, HFMA2 packed fp16; not HFMA2.MMA, which ptxas uses to move constants). The
tools, installed by `make sass-tools`: PyPI's `nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm`
(CUDA 13, in `<venv>/cuda/tools`) for sm_75 and newer, and for sm_72 and older (which CUDA 13
refuses) those of Debian's CUDA 11.8 `nvidia-cuda-toolkit` (in `<venv>/cuda/sass-legacy`).
Where the tools for an arch are absent, the counts are None: unknown, never assumed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_ROOT = Path(os.environ.get("EDGEFLOW_CUDA_ROOT", Path(sys.prefix) / "cuda"))
TOOLS = _ROOT / "tools" / "nvidia" / "cu13" / "bin"  # CUDA 13: sm_75 and newer
LEGACY_TOOLS = _ROOT / "sass-legacy" / "bin"  # CUDA 11.8: sm_72 and older too
OLDEST_ARCH = 75  # CUDA 13's nvdisasm refuses sm_72 and older ("deprecated")
CLASSES = ("tensor_core", "dp4a", "ffma", "hfma2")
_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def cuobjdump(arch: str = "sm_87") -> Path | None:
    """The cuobjdump that reads `arch` ("sm_72") cubins (with nvdisasm beside it), or None where
    it is not installed."""
    tools = TOOLS if int(arch.split("_")[1]) >= OLDEST_ARCH else LEGACY_TOOLS
    tool = tools / "cuobjdump"
    if tool.is_file() and (tools / "nvdisasm").is_file():
        return tool
    found = shutil.which("cuobjdump")
    return Path(found) if found and shutil.which("nvdisasm") else None


def instruction_classes(cubin: bytes, arch: str) -> dict[str, dict[str, int]] | None:
    """{kernel name: {class: instruction count}} with the classes of CLASSES, or None when this
    machine cannot disassemble `arch` ("sm_87") cubins."""
    tool = cuobjdump(arch)
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        env = dict(os.environ, PATH=f"{tool.parent}{os.pathsep}{os.environ.get('PATH', '')}")
        res = subprocess.run([str(tool), "-sass", str(path)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return None
    return parse(res.stdout)


def parse(sass: str) -> dict[str, dict[str, int]]:
    """Per-kernel class counts of `cuobjdump -sass` output."""
    out: dict[str, dict[str, int]] = {}
    counts = None
    for line in sass.splitlines():
        if m := _FUNCTION.match(line):
            counts = out.setdefault(m.group(1), dict.fromkeys(CLASSES, 0))
        elif counts is not None and (m := _INSTRUCTION.match(line)) and (name := _class(m.group(1))):
            counts[name] += 1
    return out


def _class(op: str) -> str | None:
    root, _, suffix = op.partition(".")
    if root in ("HMMA", "IMMA"):
        return "tensor_core"
    if root == "IDP" and suffix.startswith("4A"):
        return "dp4a"
    if root == "FFMA":
        return "ffma"
    if root == "HFMA2" and not suffix.startswith("MMA"):
        return "hfma2"
    return None
