"""The benchmark suite (`make bench`): speed, memory, compile time, Jetson predictions and
accuracy of our packages against ONNX Runtime, PyTorch and OpenCV's classical methods.

    python bench/suite.py [--models flownet2-s,flownet2-css] [--sizes 384x512,448x1024]
                          [--threads 1,2] [--runs 5] [--pairs 32] [--predict flownet2-s]
                          [--out out/bench] [--fresh]

Sections of out/bench/suite.json (written atomically, with the table out/bench/suite.md and the
plot out/bench/epe_vs_ms.png):
- packages: the default host fp32 package of each model and size (shipped weights where the
  model has them, else random: speed does not depend on them); compile seconds (the manifest's
  `compile_seconds`), size, and the peak RSS of a process that loads and runs it
  (`bench/rss.py`: the runtime alone, torch blocked as on a device).
- speed: `edgeflow bench PACKAGE --vs onnxruntime,torch --threads T --json` per package and
  thread count, each in a process of its own: the same network in one run, checked against
  torch before timing, ratios edgeflow/peer, CPU time per call; the load average beside it.
- classical: OpenCV DIS (ultrafast, fast, medium) and Farneback per size and thread count
  (`cv2.setNumThreads`), ms per pair, round-robin on one generated pair.
- jetson: the predicted time and fps of flownet2-s (`--predict`) at 448x1024 fp16 on every CUDA
  board of targets/boards.json: one package per CUDA arch, its kernels priced for each board of
  that arch by `edgeflow.prediction` (a prediction, not a measurement: no board here).
- accuracy: mean EPE and median ms per pair (images in, flow out, 2 threads or the most given)
  on the held-out synthetic set (`edgeflow synth heldout --count 64 --size 384x512 --seed 987654`,
  its first `--pairs`), round-robin per pair, each call timed once the process is idle (pools
  spin as in production): the flownet2-s package (fp32; int8 and pruned ones that
  bench/compress.py left in out/bench/compress), ONNX Runtime and torch on the same network,
  DIS presets, Farneback. The plot shows EPE against ms per pair.

Packages are cached under OUT/suite, keyed by a hash of the compiler's sources; `--fresh`
recompiles. Figures depend on the machine's load: compare within one run (ratios).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HELD_OUT = {"count": 64, "size": (384, 512), "seed": 987654}  # README: `edgeflow synth heldout ...`
CLASSICAL = ("dis-ultrafast", "dis-fast", "dis-medium", "farneback")
JETSON_SIZE, JETSON_PRECISION = (448, 1024), "fp16"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, path)


def compiler_hash() -> str:
    """A hash of what decides a package's code: the compiler's and models' sources, the boards."""
    h = hashlib.sha256()
    files = sorted([*(ROOT / "compile").rglob("*.py"), *(ROOT / "edgeflow" / "models").rglob("*.py"),
                    ROOT / "edgeflow" / "onnx_export.py", ROOT / "targets" / "boards.json"])
    for f in files:
        h.update(f.relative_to(ROOT).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


def package(cache: Path, model: str, target: str, size, precision: str, fresh: bool) -> Path:
    """The package of `model` for `target`, compiled with the CLI unless cached for these sources."""
    from edgeflow.models import SPECS
    from edgeflow.models.weights import resolve

    from edgeflow.errors import InputError

    try:
        weights = "default" if model in SPECS and resolve(model, "default") else "random"
    except InputError:  # no trained weights ship for this model
        weights = "random"
    h, w = size
    path = cache / f"{model}-{target}-{h}x{w}-{precision}-{weights}-{compiler_hash()}.tar"
    if path.exists() and not fresh:
        return path
    log(f"compile {model} for {target} at {h}x{w} {precision} ({weights} weights)")
    cache.mkdir(parents=True, exist_ok=True)
    run([str(BIN / "edgeflow"), "compile", model, "--target", target, "--size", f"{h}x{w}", "--precision",
         precision, "--weights", weights, "-o", str(path)])
    return path


class Failed(Exception):
    """A command of the suite failed; the message is its last `Error: ...` line."""


def run(cmd: list[str]) -> str:
    """stdout of `cmd`; Failed with its error line when it fails."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        errors = [line for line in p.stderr.splitlines() if line.startswith("Error:")]
        raise Failed(errors[-1] if errors else f"`{' '.join(cmd)}` failed ({p.returncode}): {p.stderr[-2000:]}")
    return p.stdout


def manifest(path: Path) -> dict:
    from edgeflow.runtime.format import read_package

    return read_package(path, check_target=False).manifest


def speed(pkg: Path, threads: int, runs: int) -> dict:
    load = load_average()
    r = json.loads(run([str(BIN / "edgeflow"), "bench", str(pkg), "--vs", "onnxruntime,torch", "--threads",
                        str(threads), "--runs", str(runs), "--json"]))
    keep = ("ms", "ratio", "effective_threads", "threads", "stats", "epe_vs_torch", "idle_wait_ms", "spin",
            "tvm_spin_count", "runs")
    return {"model": r["model"], "input_size": r["input_size"], **{k: r[k] for k in keep if k in r},
            "load_average": {"before": load, "after": load_average()}}


def memory(pkg: Path) -> dict:
    return json.loads(run([sys.executable, str(ROOT / "bench" / "rss.py"), str(pkg)]))


def classical(sizes, threads_list, runs: int) -> list[dict]:
    """ms per pair of OpenCV's methods, round-robin on a generated pair of each size."""
    import cv2
    import numpy as np

    from edgeflow.baselines import baseline
    from edgeflow.synth import generate_pair

    out = []
    for size in sizes:
        img1, img2, _ = generate_pair(np.random.default_rng(0), size)
        for threads in threads_list:
            cv2.setNumThreads(threads)
            fns = {name: baseline(name) for name in CLASSICAL}
            for fn in fns.values():
                fn(img1, img2)
            wall = {name: [] for name in fns}
            for _ in range(runs):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn(img1, img2)
                    wall[name].append(time.perf_counter() - t0)
            out += [{"method": name, "input_size": list(size), "threads": threads,
                     "ms": round(1e3 * statistics.median(v), 3)} for name, v in wall.items()]
    cv2.setNumThreads(-1)
    return out


def jetson(models, cache: Path, fresh: bool) -> list[dict]:
    """Predicted ms and fps on every CUDA board: one package per (model, CUDA arch); boards whose
    CUDA toolchain this machine lacks get {"skipped": the compiler's error}."""
    from edgeflow import prediction
    from edgeflow.inspect import kernel_report
    from edgeflow.targets import get

    boards = json.loads((ROOT / "targets" / "boards.json").read_text())
    cuda = [name for name, b in boards.items() if not name.startswith("_") and b.get("kind") == "cuda"]
    by_arch: dict[str, list[str]] = {}
    for name in cuda:
        by_arch.setdefault(get(name).cuda_arch, []).append(name)
    out = []
    for model in models:
        for arch, names in by_arch.items():
            try:
                pkg = package(cache, model, names[0], JETSON_SIZE, JETSON_PRECISION, fresh)
            except Failed as e:
                log(f"skip     {', '.join(names)}: {e}")
                out += [{"board": name, "cuda_arch": arch, "model": model, "skipped": str(e)} for name in names]
                continue
            m = manifest(pkg)
            for name in names:
                board = get(name)
                kernels = [kernel_report(k, board) for k in m.get("kernels", [])]
                pred = prediction.predict(kernels, board)
                out.append({"board": name, "cuda_arch": arch, "model": model, "input_size": list(JETSON_SIZE),
                            "precision": JETSON_PRECISION, "compiled_for": names[0],
                            "compile_seconds": round(m.get("compile_seconds", 0), 1),
                            "kernels": len(kernels), "launches": sum(k["launches"] for k in kernels),
                            "predicted_ms": pred and pred["ms"], "predicted_range_ms": pred and pred["range_ms"],
                            "predicted_fps": pred and round(1e3 / pred["ms"], 1),
                            "predicted_fps_range": pred and pred["fps_range"]})
    return out


def held_out(out: Path, pairs: int) -> Path:
    from edgeflow.synth import write_chairs

    d = out / "heldout"
    if len(list(d.glob("*_flow.flo"))) < pairs:
        log(f"write the held-out synthetic set ({pairs} of {HELD_OUT['count']} pairs, seed {HELD_OUT['seed']})")
        write_chairs(d, pairs, size=HELD_OUT["size"], seed=HELD_OUT["seed"], progress=False)
    return d


def accuracy(fp32: Path, out: Path, pairs: int, threads: int) -> dict:
    """{method: {"epe", "ms"}} on the held-out set, round-robin per pair, each call timed once the
    process is idle (pools spin as in production)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from edgeflow.baselines import baseline
    from edgeflow.benchmark import model_from_package, wait_idle
    from edgeflow.datasets import open_dataset
    from edgeflow.evaluate import model_flow
    from edgeflow.metrics import epe
    from edgeflow.onnx_export import export_onnx
    from edgeflow.runtime import load
    from edgeflow.runtime.format import read_package
    from edgeflow.runtime.preprocess import flow_to_size, to_input

    samples = [s for ds in open_dataset(held_out(out, pairs)).values() for s in ds][:pairs]
    methods = {"edgeflow fp32": load(fp32, threads=threads)}
    size = methods["edgeflow fp32"].height, methods["edgeflow fp32"].width  # the networks' input size
    for label, kind in (("edgeflow int8", "int8"), ("edgeflow pruned 0.3", "pruned"),
                        ("edgeflow pruned 0.3 + int8", "pruned-int8")):  # bench/compress.py's packages
        found = sorted((out / "compress").glob(f"flownet2-s-{kind}-{size[0]}x{size[1]}-*.tar"))
        if found:
            methods[label] = load(found[0], threads=threads)
    pkg = read_package(fp32, check_target=False)
    model = model_from_package(pkg.manifest, pkg.directory)
    torch.set_num_threads(threads)
    methods["pytorch"] = model_flow(model, size)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    session = ort.InferenceSession(export_onnx(model, size), options, providers=["CPUExecutionProvider"])

    def ort_flow(img1, img2):
        feed = {"img1": to_input(img1, size), "img2": to_input(img2, size)}
        return flow_to_size(session.run(["flow"], feed)[0][0], img1.shape[:2])

    methods["onnxruntime"] = ort_flow
    import cv2

    cv2.setNumThreads(threads)
    methods.update({name: baseline(name) for name in CLASSICAL})
    for fn in methods.values():  # warm up
        fn(samples[0].img1, samples[0].img2)
    errs = {name: [] for name in methods}
    wall = {name: [] for name in methods}
    log(f"accuracy: {len(samples)} held-out pairs x {len(methods)} methods, {threads} threads")
    for s in samples:
        for name, fn in methods.items():
            wait_idle()
            t0 = time.perf_counter()
            flow = fn(s.img1, s.img2)
            wall[name].append(time.perf_counter() - t0)
            errs[name].append(epe(np.asarray(flow), s.flow, s.valid))
    cv2.setNumThreads(-1)
    return {name: {"epe": round(float(np.mean(errs[name])), 4), "ms": round(1e3 * statistics.median(wall[name]), 3)}
            for name in methods} | {"_pairs": len(samples), "_threads": threads}


def plot(acc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    points = sorted((v["ms"], v["epe"], name) for name, v in acc.items() if not name.startswith("_"))
    for i, (ms, err, name) in enumerate(points):
        kind = "o" if name.startswith("edgeflow") else "s" if name in ("onnxruntime", "pytorch") else "^"
        ax.scatter(ms, err, marker=kind, s=40)
        # neighbours of equal EPE (the same network in three engines): labels above and below in turn
        ax.annotate(name, (ms, err), textcoords="offset points", xytext=(4, 6 if i % 2 else -12), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"ms per pair (images in, flow out; {acc['_threads']} threads)")
    ax.set_ylabel("EPE (px)")
    ax.set_title(f"flownet2-s and OpenCV on the held-out synthetic set ({acc['_pairs']} pairs "
                 f"{HELD_OUT['size'][0]}x{HELD_OUT['size'][1]})")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def table(r: dict) -> str:
    """The README's tables, markdown."""
    lines = ["| model | size | threads | edgeflow / ONNX Runtime / torch ms | ratio to ORT / torch | "
             "effective threads | load (1 min) |", "|---|---|---|---|---|---|---|"]
    for s in r["speed"]:
        ms, ratio, eff = s["ms"], s["ratio"], s["effective_threads"]
        lines.append(f"| {s['model']} | {s['input_size'][0]}x{s['input_size'][1]} | {s['threads']['requested']} | "
                     f"{ms['edgeflow']:.1f} / {ms['onnxruntime']:.1f} / {ms['torch']:.1f} | "
                     f"{ratio['onnxruntime']:.2f} / {ratio['torch']:.2f} | "
                     f"{eff['edgeflow']:.2f} / {eff['onnxruntime']:.2f} / {eff['torch']:.2f} | "
                     f"{s['load_average']['before'][0]:.2f} |")
    lines += ["", "| package | compile s | package MB | runtime peak RSS MB (imports alone) |", "|---|---|---|---|"]
    for p in r["packages"]:
        lines.append(f"| {p['model']} {p['input_size'][0]}x{p['input_size'][1]} host fp32 | {p['compile_seconds']:.0f} | "
                     f"{p['package_mb']:.1f} | {p['rss']['peak_mb']:.0f} ({p['rss']['imports_mb']:.0f}) |")
    lines += ["", "| OpenCV method | size | threads | ms per pair |", "|---|---|---|---|"]
    for c in r["classical"]:
        lines.append(f"| {c['method']} | {c['input_size'][0]}x{c['input_size'][1]} | {c['threads']} | {c['ms']:.1f} |")
    if r["jetson"]:
        lines += ["", "| board (prediction, not measured) | model, size, precision | predicted ms (range) | fps |",
                  "|---|---|---|---|"]
        for j in r["jetson"]:
            if j.get("skipped"):
                lines.append(f"| {j['board']} ({j['cuda_arch']}) | {j['model']} | not compiled here: "
                             f"{j['skipped'].removeprefix('Error: ').split(';')[0].split(' (')[0]} | - |")
                continue
            if j["predicted_ms"] is None:
                continue
            lo, hi = j["predicted_range_ms"]
            lines.append(f"| {j['board']} ({j['cuda_arch']}) | {j['model']} {j['input_size'][0]}x{j['input_size'][1]} "
                         f"{j['precision']} | {j['predicted_ms']:.1f} ({lo:.1f}-{hi:.1f}) | {j['predicted_fps']:.0f} |")
    acc = r["accuracy"]
    if acc:
        lines += ["", f"| method | held-out EPE ({acc['_pairs']} pairs) | ms per pair ({acc['_threads']} threads) |",
                  "|---|---|---|"]
        for name, v in sorted(acc.items(), key=lambda kv: kv[1]["ms"] if isinstance(kv[1], dict) else 0):
            if not name.startswith("_"):
                lines.append(f"| {name} | {v['epe']:.3f} | {v['ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="flownet2-s,flownet2-css")
    parser.add_argument("--sizes", default="384x512,448x1024")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=32, help="held-out pairs for the accuracy section (0: none)")
    parser.add_argument("--predict", default="flownet2-s", help="models to predict on the Jetsons ('' for none)")
    parser.add_argument("--out", default=str(ROOT / "out" / "bench"))
    parser.add_argument("--fresh", action="store_true", help="recompile cached packages")
    args = parser.parse_args(argv)

    from edgeflow.cli.options import parse_size

    models = [m for m in args.models.split(",") if m]
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    threads = [int(t) for t in args.threads.split(",") if t]
    out = Path(args.out)
    cache = out / "suite"
    t_start = time.time()
    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "machine": machine(),
              "load_average_start": load_average(), "packages": [], "speed": [], "classical": [], "jetson": [],
              "accuracy": {}}
    pkgs = {}
    for model in models:
        for size in sizes:
            pkgs[model, size] = p = package(cache, model, "host", size, "fp32", args.fresh)
            m = manifest(p)
            log(f"memory   {p.name}")
            result["packages"].append({"model": model, "input_size": list(size), "package": str(p),
                                       "weights": m["model"].get("weights"),
                                       "compile_seconds": round(m.get("compile_seconds", 0), 1),
                                       "package_mb": round(p.stat().st_size / 2**20, 2), "rss": memory(p)})
    for (model, size), p in pkgs.items():
        for t in threads:
            log(f"speed    {model} {size[0]}x{size[1]}, {t} threads")
            result["speed"].append(speed(p, t, args.runs))
    log("classical methods")
    result["classical"] = classical(sizes, threads, args.runs)
    predict = [m for m in args.predict.split(",") if m]
    if predict:
        log(f"jetson predictions of {', '.join(predict)} ({JETSON_SIZE[0]}x{JETSON_SIZE[1]} {JETSON_PRECISION})")
        result["jetson"] = jetson(predict, cache, args.fresh)
    if args.pairs:  # the flownet2-s package at the held-out size, else at the first size
        fp32 = pkgs.get(("flownet2-s", HELD_OUT["size"])) or package(cache, "flownet2-s", "host", sizes[0], "fp32",
                                                                      args.fresh)
        result["accuracy"] = accuracy(fp32, out, args.pairs, max(threads))
        plot(result["accuracy"], out / "epe_vs_ms.png")
    result["load_average_end"] = load_average()
    result["seconds"] = round(time.time() - t_start, 1)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "suite.json", json.dumps(result, indent=1))
    write_atomic(out / "suite.md", table(result))
    print(table(result))
    log(f"done in {result['seconds']:.0f} s: {out / 'suite.json'}, {out / 'suite.md'}"
        + (f", {out / 'epe_vs_ms.png'}" if args.pairs else ""))
    return 0


def machine() -> dict:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
