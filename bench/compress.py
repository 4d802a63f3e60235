"""What compression buys on the host: speed and accuracy of fp32, pruned, int8 and pruned+int8
packages of the shipped flownet2-s against ONNX Runtime fp32 and int8, in one run.

    python bench/compress.py [--size 384x512] [--pruned pruned-0.3 | --pruned distil --prune 0.3
                             --distill-steps 200] [--runs 10] [--threads N] [--pairs 32] [--json]

The pruned net is the checkpoint shipped beside flownet2-s's weights (`--pruned pruned-0.3`, see
MODEL_CARD.md for how it was distilled), a weight file, or (`--pruned distil`) pruned by
`--prune` and distilled for `--distill-steps` now, its weights saved. Packages are compiled into
out/bench/compress/, reused when present. ONNX Runtime fp32 runs the unpruned net exported by
`edgeflow.onnx_export`; ONNX Runtime int8 is its own static QDQ quantization of the same export
(`onnxruntime.quantization.quantize_static`: uint8 activations, int8 per-channel weights,
calibrated on 8 generated pairs). All six engines get the same threads (intra-op, no spinning:
FACTS.md) and the same prepared input, and are timed round-robin, `--runs` rounds, medians
reported. EPE against ground truth on `--pairs` held-out generated pairs (`edgeflow.synth`, a
seed no compile step uses) and on ../shared/realflow (`edgeflow.evaluate`, every set; skipped
where absent). Ratios: each engine's ms over ONNX Runtime fp32's and int8's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "bench" / "compress"
REALFLOW = ROOT.parent / "shared" / "realflow"
HELD_OUT_SEED = 777001


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def packages(size, pruned: str, ratio: float, distill_steps: int) -> dict[str, Path]:
    """{name: package path} of fp32, pruned, int8 and pruned+int8, compiled where missing.
    pruned: weights of the pruned net (a shipped checkpoint's name or a file), or "distil"."""
    import torch

    from edgeflow.compile import compile, prune
    from edgeflow.compile.prune import save
    from edgeflow.models import create
    from edgeflow.models.weights import resolve, sha256_file

    OUT.mkdir(parents=True, exist_ok=True)
    h, w = size
    pruned_weights = pruned
    if pruned == "distil":
        pruned_weights = str(OUT / f"flownet2-s-pruned-{ratio:g}-{distill_steps}.pt")
        if not Path(pruned_weights).exists():
            log(f"prune flownet2-s by {ratio:g}, {distill_steps} distillation steps")
            torch.manual_seed(0)
            save(prune(create("flownet2-s"), ratio, distill_steps=distill_steps, progress=log), "flownet2-s",
                 pruned_weights)
    plan = {"fp32": ("default", "fp32"), "pruned": (pruned_weights, "fp32"),
            "int8": ("default", "int8"), "pruned+int8": (pruned_weights, "int8")}
    out = {}
    for name, (weights, precision) in plan.items():
        digest = sha256_file(resolve("flownet2-s", weights))[:12]  # a new checkpoint: a new package
        path = OUT / f"flownet2-s-{name.replace('+', '-')}-{h}x{w}-{digest}.tar"
        if not path.exists():
            log(f"compile {name}")
            compile("flownet2-s", target="host", input_size=size, precision=precision, weights=weights, out=path,
                    force=True, progress=log)
        out[name] = path
    return out


def ort_sessions(size, threads: int) -> dict:
    """{"onnxruntime-fp32": session, "onnxruntime-int8": session} of the unpruned shipped net."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgeflow.models import create
    from edgeflow.onnx_export import export_onnx
    from edgeflow.runtime.preprocess import to_input
    from edgeflow.synth import generate_pair

    fp32 = OUT / f"flownet2-s-{size[0]}x{size[1]}.onnx"
    int8 = OUT / f"flownet2-s-{size[0]}x{size[1]}-int8-qdq.onnx"
    if not fp32.exists():
        fp32.write_bytes(export_onnx(create("flownet2-s"), size))
    if not int8.exists():
        log("onnxruntime: static QDQ quantization of the export (8 generated calibration pairs)")

        class Reader(CalibrationDataReader):
            def __init__(self):
                rng = np.random.default_rng(5)
                pairs = [generate_pair(rng, size)[:2] for _ in range(8)]
                self.feeds = iter([{"img1": to_input(a), "img2": to_input(b)} for a, b in pairs])

            def get_next(self):
                return next(self.feeds, None)

        quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)

    def session(path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    return {"onnxruntime-fp32": session(fp32), "onnxruntime-int8": session(int8)}


def flow_fn(call, size):
    """(img1, img2) -> HxWx2 at the images' size, through `call(x1, x2) -> [2,H,W]` at `size`."""
    from edgeflow.runtime.preprocess import flow_to_size, to_input

    def fn(img1, img2):
        return flow_to_size(np.asarray(call(to_input(img1, size), to_input(img2, size))), img1.shape[:2])

    return fn


def held_out_epe(fn, size, pairs: int) -> float:
    from edgeflow.metrics import epe
    from edgeflow.synth import generate_pair

    rng = np.random.default_rng(HELD_OUT_SEED)
    errs = []
    for _ in range(pairs):
        img1, img2, flow = generate_pair(rng, size)
        errs.append(epe(fn(img1, img2), flow))
    return float(np.mean(errs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="384x512")
    parser.add_argument("--pruned", default="pruned-0.3")
    parser.add_argument("--prune", type=float, default=0.3)
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")  # idle TVM workers must not spin (FACTS.md)
    from edgeflow.cli.options import parse_size
    from edgeflow.runtime import load
    from edgeflow.runtime.threads import check_threads
    from edgeflow.synth import generate_pair

    size = parse_size(args.size)
    threads = check_threads(args.threads)
    paths = packages(size, args.pruned, args.prune, args.distill_steps)
    engines = {name: load(path, threads=threads) for name, path in paths.items()}
    sessions = ort_sessions(size, threads)
    img1, img2, _ = generate_pair(np.random.default_rng(0), size)
    e0 = engines["fp32"]
    x1, x2 = e0.prepare(img1), e0.prepare(img2)
    calls = {name: (lambda e=e: e.run_tensor(x1, x2)) for name, e in engines.items()}
    for name, s in sessions.items():
        calls[name] = lambda s=s: s.run(["flow"], {"img1": x1, "img2": x2})[0][0]
    for call in calls.values():  # warm up
        call()
    log(f"time {args.runs} rounds of {', '.join(calls)} ({threads} threads)")
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(args.runs):
        for name, call in calls.items():
            c0, t0 = time.process_time(), time.perf_counter()
            call()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    ms = {name: 1e3 * statistics.median(v) for name, v in wall.items()}

    log(f"accuracy: {args.pairs} held-out generated pairs" + (", realflow" if REALFLOW.is_dir() else ""))
    from edgeflow.evaluate import evaluate

    fns = {name: e for name, e in engines.items()}
    for name, s in sessions.items():
        fns[name] = flow_fn(lambda a, b, s=s: s.run(["flow"], {"img1": a, "img2": b})[0][0], size)
    accuracy = {}
    for name, fn in fns.items():
        entry = {"held_out_epe": round(held_out_epe(fn, size, args.pairs), 4)}
        if REALFLOW.is_dir():
            rep = evaluate(fn, REALFLOW, progress=False)
            entry["realflow_epe"] = round(rep["epe"], 4)
            entry["realflow_sets"] = {k: round(v["epe"], 4) for k, v in rep["sets"].items()}
        accuracy[name] = entry
        log(f"  {name}: {entry}")
    base = accuracy["fp32"]
    result = {
        "model": "flownet2-s (shipped weights)", "input_size": list(size), "threads": threads, "runs": args.runs,
        "pruned": args.pruned, "prune": args.prune, "distill_steps": args.distill_steps,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "ms": {k: round(v, 3) for k, v in ms.items()},
        "cpu_ms": {k: round(1e3 * statistics.median(v), 3) for k, v in cpu.items()},
        "speedup_vs_onnxruntime_fp32": {k: round(ms["onnxruntime-fp32"] / v, 3) for k, v in ms.items()},
        "speedup_vs_onnxruntime_int8": {k: round(ms["onnxruntime-int8"] / v, 3) for k, v in ms.items()},
        "accuracy": accuracy,
        "epe_increase_vs_fp32": {k: {m: round(v[m] / base[m] - 1, 4) for m in ("held_out_epe", "realflow_epe")
                                     if m in v} for k, v in accuracy.items()},
        "realflow_middlebury_increase_vs_fp32": {
            k: round(v["realflow_sets"]["middlebury"] / base["realflow_sets"]["middlebury"] - 1, 4)
            for k, v in accuracy.items() if "realflow_sets" in v and "middlebury" in v["realflow_sets"]},
        "packages": {k: str(v) for k, v in paths.items()},
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for k in ms:
            a = accuracy[k]
            print(f"{k:18s} {ms[k]:8.2f} ms  x{result['speedup_vs_onnxruntime_fp32'][k]:.2f} vs ORT fp32  "
                  f"held-out EPE {a['held_out_epe']:.4f}  realflow EPE {a.get('realflow_epe', float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
