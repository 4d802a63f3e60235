"""edgeflow.compile: FlowNet2 model -> TVM package for a Jetson board or a CPU.

    compile(model, *, target, input_size, precision="fp32", prune=0.0, calibration=None,
            out=path, sign=None) -> CompileResult (path, manifest)
    prune(model, ratio, ...) -> pruned torch module (structured pruning + distillation)
    quantize(model, calibration_frames, ...) -> fake-quant int8 torch module (calibration, sensitivity)

The stages (each its own module): prune and quantize (optional), frontend (torch.export -> Relax), lower
(per-target pipelines, device code); the package is written by `edgeflow.runtime.format`, which
owns the format. Importing this package imports neither torch nor TVM.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeflow.compile.prune import prune
from edgeflow.compile.quantize import quantize
from edgeflow.errors import AccuracyError, InputError

__all__ = ["compile", "prune", "quantize", "CompileResult", "PRECISIONS", "TOLERANCE"]

PRECISIONS = ("fp32", "fp16", "int8")
# Largest EPE (pixels) between compiled and torch model accepted without force=True. int8: the
# torch model is the fake-quant one (`quantize`). Each compiled int8 layer computes the fake-quant
# layer's integers exactly (tests/test_quantize.py: within 1e-6 relative, same input); but float
# rounding elsewhere (fp32 layers, summation order) moves a few activations across a rounding
# boundary of the uint8 grid, and the net amplifies that: the fake-quant model itself moves by
# 0.05-0.09 px under 1e-5 relative input noise (flownet2-s, 128x192); the package measured 0.015-0.08.
TOLERANCE = {"fp32": 0.01, "fp16": 0.25, "int8": 0.15}
ACCURACY_PAIRS = 2
ACCURACY_SEED = 20261124  # the generated pairs the accuracy is measured on
MAX_EPE_INCREASE = 0.05  # compression (prune=, int8) may grow the EPE against ground truth by this share
VALIDATION_PAIRS = 4
VALIDATION_SEED = 20261129  # held-out generated pairs (with ground truth) of the compression gate


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
        v = m["accuracy"].get("validation")
        gt = (f", EPE vs ground truth {v['before']:.4f} -> {v['after']:.4f} px ({_share(v['increase'])})"
              if v else "")
        tuned = f", {m['tuning']['applied']} tuned kernels" if m.get("tuning") else ""
        return (f"{self.path}: {m['model']['name']} for {m['target']['name']}, {m['precision']}, "
                f"EPE vs torch {m['accuracy']['epe_vs_torch']:.4f} px{gt}{tuned}{signed}")


def compile(model="flownet2-s", *, target: str = "jetson", input_size=(448, 1024), precision: str = "fp32",
            prune: float = 0.0, calibration=None, out=None, weights="default", force: bool = False,
            sign: str | os.PathLike | None = None, tuning_db: str | os.PathLike | None = None,
            progress: Callable[[str], None] | None = None, max_epe_increase: float = MAX_EPE_INCREASE,
            quantization: dict | None = None) -> CompileResult:
    """Compile `model` (registry name or torch module) for `target` into the package `out`.

    input_size: (H, W), multiples of 64. precision: "fp32", "fp16" or "int8"
    (`edgeflow.compile.quantize` calibrates on `calibration` or generated pairs; int8 kernels:
    `quantize_ops`, AVX-512 VNNI on x86, dp4a on the Jetsons). prune > 0 prunes that share of
    channels first and distils on `calibration` (a frame directory) or generated pairs
    (`edgeflow.compile.prune.prune`); a pruned weight file compiles as it is. The package records
    the EPE of the compiled model against the torch model on generated pairs; above
    TOLERANCE[precision] (or when it is not a number) AccuracyError and nothing is written,
    unless `force`. When compressing (prune or int8), the EPE against ground truth of the
    compiled model and of the uncompressed float model on VALIDATION_PAIRS held-out generated
    pairs: growing by more than `max_epe_increase` (relative), AccuracyError and nothing written,
    unless `force`. quantization: more keyword arguments of `quantize` (method, percentile,
    calibration_pairs, size, keep, ...). sign: the path of an Ed25519 private key (`edgeflow
    keygen`) that signs the package. tuning_db: a database directory written by
    `edgeflow.compile.tune.tune` for this model, size, precision and target (InputError
    otherwise); its schedules replace the hand ones where they measured faster, and the
    manifest's `tuning` lists them. Returns a CompileResult.
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
    if calibration is not None and not prune and precision != "int8":
        raise InputError("calibration: frames are used by pruning (prune=) and int8 quantization (precision="
                         "'int8'); give one of them or leave calibration out")
    if not max_epe_increase >= 0:
        raise InputError(f"max_epe_increase={max_epe_increase}: expected a relative increase >= 0, e.g. 0.05")
    if precision == "int8" and board.is_cuda:
        from edgeflow.compile.quantize_ops import check_int8_target

        check_int8_target(board)
    signing_key = signer = None
    if sign is not None:
        from edgeflow.runtime import signing

        signing_key = signing.load_private_key(sign)  # a bad key fails before minutes of compiling
        signer = signing.key_id(signing_key.public_key())
    frontend.check_size(input_size)  # before minutes of pruning or compiling
    torch_model, model_info = _resolve_model(model, weights)
    float_model = torch_model
    if prune:
        torch_model = prune_model(torch_model, prune, calibration=calibration, progress=say)
    compressed = torch_model  # float: parameters and MACs are counted on it (int8 layers do as many)
    if precision == "int8":
        from edgeflow.compile.quantize import quantize as quantize_model

        torch_model = quantize_model(torch_model, calibration, max_epe_increase=max_epe_increase, progress=say,
                                     **(quantization or {}))
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
                                                 precision, cuda=board.is_cuda)
        ex, device_code = lower.build(mod, board, tuning)
        say("verify   EPE against the torch model on generated pairs")
        run = _host_runner(mod, params, board, ex)
        epe = _measure_epe(torch_model, run, (h, w))
        validation = None
        if prune or precision == "int8":
            say(f"validate EPE against ground truth on {VALIDATION_PAIRS} held-out generated pairs, compiled vs "
                f"the uncompressed float model")
            validation = _validate(float_model, run, (h, w), max_epe_increase)
            say(f"         float {validation['before']:.4f} px, compiled {validation['after']:.4f} px "
                f"({_share(validation['increase'])})")
        cpu_kernels = lower.cpu_int8_kernels(ex) if precision == "int8" and not board.is_cuda else None
    tolerance = TOLERANCE[precision]
    if not epe <= tolerance and not force:  # NaN fails too
        raise AccuracyError(f"compiled {name} differs from the torch model by EPE {epe:.4f} px (tolerance "
                            f"{tolerance} px for {precision}); nothing written (force=True writes it anyway)")
    grew = None if validation is None else validation["increase"]
    if validation is not None and not (math.inf if grew is None else grew) <= max_epe_increase and not force:
        raise AccuracyError(f"compressed {name} has EPE {validation['after']:.4f} px against ground truth on "
                            f"{VALIDATION_PAIRS} held-out generated pairs, {_share(grew)} over the float model's "
                            f"{validation['before']:.4f} px (max_epe_increase={max_epe_increase:g}); nothing written "
                            f"(force=True writes it anyway)")
    say(f"package  {out}")
    files = {"params.npz": params_npz(param_names, params)}
    with _tempdir() as d:
        lib = Path(d) / "model.so"
        lower.export(ex, str(lib), board)
        files["lib/model.so"] = lib.read_bytes()
    if device_code is not None:
        files["lib/kernels.cubin"] = device_code.cubin
        files["lib/kernels.json"] = device_code.metadata_json().encode()
    measured_with = "this build"
    if board.is_cuda:
        measured_with = "an LLVM build of the same Relax module and precision (no GPU at compile time)"
    elif board.cross_compiled:  # e.g. aarch64-cpu: same integers, this CPU's instructions
        measured_with = "a build of the same Relax module and precision for this machine's CPU"
    accuracy = {"epe_vs_torch": round(epe, 6) if epe == epe else None, "frames": ACCURACY_PAIRS,
                "tolerance": tolerance, "measured_on": "generated pairs", "measured_with": measured_with}
    if validation is not None:
        accuracy["validation"] = validation
    quantization = None
    if precision == "int8":
        quantization = dict(torch_model.quantization, kernels=cpu_kernels)
    model_cost = cost(compressed, (h, w))
    if prune or precision == "int8":  # the manifest says what compression cost and saved
        before = cost(float_model, (h, w))
        model_cost["before"] = {"parameters": before["parameters"], "macs": before["macs"]}
    manifest = build_manifest(model=model_info, input_size=(h, w), precision=precision, board=board,
                              versions=_versions(), param_names=param_names, accuracy=accuracy,
                              kernels=device_code.kernels if device_code else [],
                              compile_seconds=time.time() - t0, pruning=manifest_entry(compressed),
                              quantization=quantization, cost=model_cost,
                              tuning=tuning.manifest_entry() if tuning is not None else None)
    manifest = write_package(out, manifest, files, signing_key=signing_key)
    return CompileResult(out, manifest, signer)


def _share(v) -> str:
    """A relative change as "+4.2%" ("+inf" where it is not a number: the manifest stores None)."""
    return "+inf" if v is None else f"{v:+.1%}"


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


def _host_runner(mod, params, board, ex):
    """run(a, b) -> flow [1,2,H,W] of the compiled model on this CPU (numpy in and out).

    mod, params: the prepared module and its parameters; ex: its build for `board` (rebuilt for
    this CPU where the board's code cannot run here)."""
    import tvm
    from tvm import relax

    from edgeflow import targets
    from edgeflow.compile import lower

    if board.is_cuda or board.cross_compiled:  # cannot run here: run the same module built for this CPU
        ex, _ = lower.build(mod, targets.get("host"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    params = [tvm.runtime.tensor(p) for p in params]

    def run(a, b):
        got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), *params)
        return (got[0] if not hasattr(got, "numpy") else got).numpy()

    return run


def _measure_epe(torch_model, run, size) -> float:
    """Mean EPE between the compiled model (`run`, see `_host_runner`) and the torch model on
    generated pairs."""
    import numpy as np
    import torch

    from edgeflow.metrics import epe_chw
    from edgeflow.runtime.preprocess import to_input
    from edgeflow.synth import generate_pair

    rng = np.random.default_rng(ACCURACY_SEED)
    errs = []
    for _ in range(ACCURACY_PAIRS):
        img1, img2, _flow = generate_pair(rng, size)
        a, b = to_input(img1), to_input(img2)
        with torch.no_grad():
            want = torch_model(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        errs.append(epe_chw(run(a, b), want))
    return float(np.mean(errs))


def _validate(float_model, run, size, max_increase: float) -> dict:
    """EPE against ground truth on VALIDATION_PAIRS held-out generated pairs of the uncompressed
    float torch model ("before") and of the compiled model ("after"), and the relative increase."""
    import numpy as np
    import torch

    from edgeflow.metrics import epe_chw
    from edgeflow.runtime.preprocess import to_input
    from edgeflow.synth import generate_pair

    rng = np.random.default_rng(VALIDATION_SEED)
    before, after = [], []
    for _ in range(VALIDATION_PAIRS):
        img1, img2, flow = generate_pair(rng, size)
        a, b = to_input(img1), to_input(img2)
        gt = np.ascontiguousarray(flow.transpose(2, 0, 1))[None]
        with torch.no_grad():
            before.append(epe_chw(float_model(torch.from_numpy(a), torch.from_numpy(b)).numpy(), gt))
        after.append(epe_chw(run(a, b), gt))
    b, a = float(np.mean(before)), float(np.mean(after))
    increase = (a - b) / b if b > 0 else (0.0 if a <= b else float("inf"))
    finite = lambda v: round(v, 5) if math.isfinite(v) else None  # noqa: E731 - the manifest is strict JSON
    return {"before": round(b, 5), "after": round(a, 5), "increase": finite(increase),
            "max_increase": finite(float(max_increase)), "pairs": VALIDATION_PAIRS, "size": list(size),
            "data": "held-out generated pairs (edgeflow.synth), EPE against ground truth; before: the uncompressed "
                    "float torch model, after: this package"}


def _versions() -> dict:
    import torch
    import tvm

    from edgeflow import __version__

    return {"edgeflow": __version__, "tvm": tvm.__version__, "torch": torch.__version__}


def _tempdir():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="edgeflow-")
