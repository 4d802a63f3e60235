"""edgeflow.compile: FlowNet2 model -> TVM package for a Jetson board or a CPU.

    compile(model, *, target, input_size, precision="fp32", prune=0.0, calibration=None,
            out=path, sign=None) -> CompileResult (path, manifest)
    prune(model, ratio, ...) -> pruned torch module (structured pruning + distillation)

The stages (each its own module): prune (optional), frontend (torch.export -> Relax), lower
(per-target pipelines, device code); the package is written by `edgeflow.runtime.format`, which
owns the format. Importing this package imports neither torch nor TVM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeflow.compile.prune import prune
from edgeflow.errors import AccuracyError, InputError

__all__ = ["compile", "prune", "CompileResult", "PRECISIONS", "TOLERANCE"]

PRECISIONS = ("fp32", "fp16")
# Largest EPE (pixels) between compiled and torch model accepted without force=True.
TOLERANCE = {"fp32": 0.01, "fp16": 0.25}
ACCURACY_PAIRS = 2
ACCURACY_SEED = 20261124  # the generated pairs the accuracy is measured on


@dataclass(frozen=True)
class CompileResult:
    """What `compile` wrote: the package's path, its manifest (as written, with file hashes) and
    the key id of its signature (None when unsigned)."""

    path: Path
    manifest: dict
    signer: str | None = None

    def __fspath__(self) -> str:
        return str(self.path)

    def summary(self) -> str:
        """One line: path, model, target, precision, accuracy and signer."""
        m = self.manifest
        signed = f", signed by key {self.signer}" if self.signer else ", unsigned"
        tuned = f", {m['tuning']['applied']} tuned kernels" if m.get("tuning") else ""
        return (f"{self.path}: {m['model']['name']} for {m['target']['name']}, {m['precision']}, "
                f"EPE vs torch {m['accuracy']['epe_vs_torch']:.4f} px{tuned}{signed}")


def compile(model="flownet2-s", *, target: str = "jetson", input_size=(448, 1024), precision: str = "fp32",
            prune: float = 0.0, calibration=None, out=None, weights="default", force: bool = False,
            sign: str | os.PathLike | None = None, tuning_db: str | os.PathLike | None = None,
            progress: Callable[[str], None] | None = None) -> CompileResult:
    """Compile `model` (registry name or torch module) for `target` into the package `out`.

    input_size: (H, W), multiples of 64. precision: "fp32" or "fp16". prune > 0 prunes that share
    of channels first and distils on `calibration` (a frame directory) or generated pairs
    (`edgeflow.compile.prune.prune`); a pruned weight file compiles as it is. The package records
    the EPE of the compiled model against the torch model on generated pairs; above
    TOLERANCE[precision] (or when it is not a number) AccuracyError and nothing is written,
    unless `force`. sign: the path of an Ed25519 private key (`edgeflow keygen`) that signs the
    package. tuning_db: a database directory written by `edgeflow.compile.tune.tune` for this
    model, size, precision and target (InputError otherwise); its schedules replace the hand
    ones where they measured faster, and the manifest's `tuning` lists them. Returns a
    CompileResult.
    """
    import time

    from edgeflow import targets
    from edgeflow.compile import frontend, lower
    from edgeflow.compile.cost import cost
    from edgeflow.compile.prune import manifest_entry, prune as prune_model
    from edgeflow.runtime.format import build_manifest, params_npz, write_package

    say = progress or (lambda msg: None)
    board = targets.get(target)
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if calibration is not None and not prune:
        raise InputError("calibration: frames are used by pruning (prune=) and int8 quantization; give prune= "
                         "or leave calibration out")
    signing_key = signer = None
    if sign is not None:
        from edgeflow.runtime import signing

        signing_key = signing.load_private_key(sign)  # a bad key fails before minutes of compiling
        signer = signing.key_id(signing_key.public_key())
    frontend.check_size(input_size)  # before minutes of pruning or compiling
    torch_model, model_info = _resolve_model(model, weights)
    if prune:
        torch_model = prune_model(torch_model, prune, calibration=calibration, progress=say)
    h, w = input_size
    name = model_info["name"]
    tuning = None
    if tuning_db is not None:
        from edgeflow.compile.tune import open_database

        tuning = open_database(tuning_db, model=model_info, target=board.name, input_size=(h, w), precision=precision)
    out = Path(out or f"{name}-{board.name}-{precision}-{h}x{w}.tar")

    t0 = time.time()
    with lower.TVM_LOCK:  # TVM keeps process-wide state: compiles in several threads take turns
        say(f"export   {name} at {h}x{w} (torch.export -> Relax)")
        relax_model = frontend.to_relax(torch_model, (h, w))
        say(f"lower    for {board.name} ({board.kind}{' ' + board.cuda_arch if board.is_cuda else ''}, {precision})")
        mod, params, param_names = lower.prepare(relax_model.mod, relax_model.params, relax_model.param_names,
                                                 precision)
        ex, device_code = lower.build(mod, board, tuning)
        say("verify   EPE against the torch model on generated pairs")
        epe = _measure_epe(torch_model, mod, params, board, ex, (h, w))
    tolerance = TOLERANCE[precision]
    if not epe <= tolerance and not force:  # NaN fails too
        raise AccuracyError(f"compiled {name} differs from the torch model by EPE {epe:.4f} px (tolerance "
                            f"{tolerance} px for {precision}); nothing written (force=True writes it anyway)")
    say(f"package  {out}")
    files = {"params.npz": params_npz(param_names, params)}
    with _tempdir() as d:
        lib = Path(d) / "model.so"
        lower.export(ex, str(lib), board)
        files["lib/model.so"] = lib.read_bytes()
    if device_code is not None:
        files["lib/kernels.cubin"] = device_code.cubin
        files["lib/kernels.json"] = device_code.metadata_json().encode()
    accuracy = {"epe_vs_torch": round(epe, 6) if epe == epe else None, "frames": ACCURACY_PAIRS,
                "tolerance": tolerance, "measured_on": "generated pairs",
                "measured_with": "this build" if not board.is_cuda else
                "an LLVM build of the same Relax module and precision (no GPU at compile time)"}
    manifest = build_manifest(model=model_info, input_size=(h, w), precision=precision, board=board,
                              versions=_versions(), param_names=param_names, accuracy=accuracy,
                              kernels=device_code.kernels if device_code else [],
                              compile_seconds=time.time() - t0, pruning=manifest_entry(torch_model),
                              cost=cost(torch_model, (h, w)),
                              tuning=tuning.manifest_entry() if tuning is not None else None)
    manifest = write_package(out, manifest, files, signing_key=signing_key)
    return CompileResult(out, manifest, signer)


def _resolve_model(model, weights):
    """(torch module, manifest model info) for a registry name or a module."""
    from edgeflow.models import create, spec

    if isinstance(model, str):
        s = spec(model)
        if weights == "random":
            weights = None
        module = create(model, weights=weights)
        return module, {"name": s.name, "stages": s.stages, "width": s.width,
                        "weights": "random" if weights is None else str(weights),
                        "weights_sha256": _weights_sha(model, weights)}
    return model, {"name": type(model).__name__, "stages": getattr(model, "stages", None),
                   "width": getattr(model, "width", None), "weights": "module", "weights_sha256": None}


def _weights_sha(name, weights):
    if weights is None:
        return None
    from edgeflow.models.weights import resolve, sha256_file

    return sha256_file(resolve(name, weights))


def _measure_epe(torch_model, mod, params, board, ex, size) -> float:
    """Mean EPE between the compiled model and the torch model on generated pairs.

    mod, params: the prepared module and its parameters; ex: its build for `board`.
    """
    import numpy as np
    import torch
    import tvm
    from tvm import relax

    from edgeflow import targets
    from edgeflow.compile import lower
    from edgeflow.metrics import epe_chw
    from edgeflow.runtime.preprocess import to_input
    from edgeflow.synth import generate_pair

    if board.is_cuda or board.cross_compiled:  # cannot run here: run the same module built for this CPU
        ex, _ = lower.build(mod, targets.get("host"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    params = [tvm.runtime.tensor(p) for p in params]
    rng = np.random.default_rng(ACCURACY_SEED)
    errs = []
    for _ in range(ACCURACY_PAIRS):
        img1, img2, _flow = generate_pair(rng, size)
        a, b = to_input(img1), to_input(img2)
        got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), *params)
        got = (got[0] if not hasattr(got, "numpy") else got).numpy()
        with torch.no_grad():
            want = torch_model(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        errs.append(epe_chw(got, want))
    return float(np.mean(errs))


def _versions() -> dict:
    import torch
    import tvm

    from edgeflow import __version__

    return {"edgeflow": __version__, "tvm": tvm.__version__, "torch": torch.__version__}


def _tempdir():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="edgeflow-")
