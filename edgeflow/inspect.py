"""What a compiled package holds and what it should cost on its board.

    report = inspect_package("flownet2-s-orin.tar")     # a dict (what `edgeflow inspect --json` prints)
    print(format_report(report))                          # the table `edgeflow inspect` prints

CUDA packages, per kernel: registers, spills and shared memory (ptxas, at compile time), where
its arithmetic runs (tensor cores, dp4a or FMA, read from the cubin's SASS at compile time by
`edgeflow.compile.sass`; unknown where that was not possible), grid and block size, occupancy
on the package's board (`Board.occupancy`), FLOPs and bytes moved (counted in the lowered TIR
at compile time by `edgeflow.compile.kernel_stats`), the roofline time on the board at its
datasheet peaks (`Board.roofline_seconds`, a bound no kernel reaches) and the predicted time
range (`edgeflow.prediction`: an achievable fraction of the peaks per kind of kernel, plus launch
overhead). The predicted times, times the launches per inference, add up to a predicted frame
time range: a prediction, not a measurement (there is no board here). Kernels of our
hand-written operators (correlation, warp) carry the operator's name. All packages: target, precision,
accuracy, file sizes, parameters and convolution MACs per frame pair (the manifest's "cost"), and
for a pruned network what pruning removed and cost in EPE (the manifest's "pruning").

Reads the package with `edgeflow.runtime.format` (digests and signature verified, target not
checked; with `trusted_keys`, only a package signed by one of them) and
the boards table: standard library only, no TVM, no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeflow import prediction

PREDICTION = "prediction (no board measured)"


def inspect_package(path: str | os.PathLike, *, trusted_keys=None) -> dict:
    """The report of the package at `path` (PackageError if it is damaged, forged, untrusted or
    of an unknown format). Keys: package, manifest_sha256, signer (key id or None), model, input,
    precision, target, accuracy, files (bytes per file), cost (parameters, macs), pruning (None
    when unpruned; the report without its per-layer channels), and for CUDA packages board,
    kernels (per kernel, slowest first) and summary."""
    from edgeflow.runtime.format import read_package

    pkg = read_package(path, check_target=False, trusted_keys=trusted_keys)
    manifest, directory = pkg.manifest, pkg.directory
    h, w = manifest["input"]["height"], manifest["input"]["width"]
    report = {"package": str(path), "manifest_sha256": pkg.manifest_sha256, "signer": pkg.signer,
              "model": manifest["model"], "input": [h, w],
              "precision": manifest["precision"], "target": manifest["target"],
              "accuracy": manifest.get("accuracy"), "compile_seconds": manifest.get("compile_seconds"),
              "files": {name: (Path(directory) / name).stat().st_size for name in sorted(manifest["files"])},
              "cost": manifest.get("cost"), "pruning": _pruning(manifest.get("pruning")),
              "quantization": _quantization(manifest.get("quantization"))}
    if manifest["target"].get("kind") != "cuda":
        report["note"] = "per-kernel statistics (registers, occupancy, roofline) are for CUDA packages only"
        return report
    board = _board(manifest["target"])
    report["board"] = {"name": board.name, "description": board.description, "cuda_arch": board.cuda_arch,
                       "sm_count": board.sm_count, "peak_fp32_tflops": board.peak_fp32_tflops,
                       "peak_fp16_tflops": board.peak_fp16_tflops, "memory_bandwidth_gbs": board.memory_bandwidth_gbs}
    report["kernels"] = sorted((kernel_report(k, board) for k in manifest.get("kernels", [])),
                               key=lambda k: -(k["predicted_us"] or [0, 0])[1] * k["launches"])
    report["summary"] = summary(report["kernels"], board)
    return report


def kernel_report(kernel: dict, board) -> dict:
    """One manifest kernel entry completed with its occupancy and roofline time on `board`
    (None where the package predates the kernel statistics)."""
    k = {"name": kernel["name"], "op": kernel.get("op"), "launches": kernel.get("launches", 1),
         "grid": kernel.get("grid"), "block": kernel.get("block"), "threads_per_block": kernel.get("threads_per_block"),
         "registers": kernel["registers"], "spill_stores": kernel["spill_stores"], "spill_loads": kernel["spill_loads"],
         "shared_bytes": kernel["shared_bytes"], "stack_bytes": kernel.get("stack_bytes", 0),
         "flops": kernel.get("flops"), "flops_fp16": kernel.get("flops_fp16", 0), "bytes": kernel.get("bytes"),
         "sass": kernel.get("sass"), "units": units(kernel.get("sass")),
         "occupancy": None, "blocks_per_sm": None, "limited_by": None, "roofline_us": None, "bound": None,
         "kind": None, "predicted_us": None}
    if k["threads_per_block"]:
        occ = board.occupancy(k["registers"], k["threads_per_block"], k["shared_bytes"])
        k.update(occupancy=occ["occupancy"], blocks_per_sm=occ["blocks_per_sm"], limited_by=occ["limited_by"])
    if k["flops"] is not None and k["bytes"] is not None:
        seconds, bound = board.roofline_seconds(k["flops"], k["bytes"], k["flops_fp16"] or 0)
        k.update(roofline_us=round(seconds * 1e6, 3), bound=bound, kind=prediction.kernel_kind(k),
                 predicted_us=[round(v, 3) for v in prediction.kernel_range_us(k, board)])
    return k


def units(sass: dict | None) -> str | None:
    """Where a kernel's arithmetic runs, from the instruction counts of its SASS: "tensor core",
    "dp4a", "fma" (FFMA/HFMA2 only), "other" (none of those), None (SASS not read)."""
    if sass is None:
        return None
    for name, unit in (("tensor_core", "tensor core"), ("dp4a", "dp4a")):
        if sass.get(name):
            return unit
    return "fma" if sass.get("ffma") or sass.get("hfma2") else "other"


def summary(kernels: list[dict], board) -> dict:
    """Totals over the kernels: counts, worst resources, work per inference and the predicted
    frame time and fps on `board` (None when a kernel lacks statistics)."""
    out = {"kernels": len(kernels), "launches": sum(k["launches"] for k in kernels),
           "max_registers": max((k["registers"] for k in kernels), default=0),
           "spill_bytes": sum(k["spill_stores"] + k["spill_loads"] for k in kernels),
           "max_shared_bytes": max((k["shared_bytes"] for k in kernels), default=0),
           "hand_written": sorted({k["op"] for k in kernels if k["op"]}),
           "convolutions": _convolutions(kernels),
           "flops": None, "bytes": None, "roofline_ms": None, "predicted_ms": None, "predicted_range_ms": None,
           "predicted_fps": None}
    if kernels and all(k["roofline_us"] is not None for k in kernels):
        roofline = sum(k["roofline_us"] * k["launches"] for k in kernels) / 1e3
        pred = prediction.predict(kernels, board)
        out.update(flops=sum(k["flops"] * k["launches"] for k in kernels),
                   bytes=sum(k["bytes"] * k["launches"] for k in kernels),
                   roofline_ms=round(roofline, 4), predicted_ms=pred["ms"], predicted_range_ms=pred["range_ms"],
                   predicted_fps=round(1e3 / pred["ms"], 1), predicted_by_kind_ms=pred["by_kind"],
                   prediction=f"{PREDICTION} on {board.name}: {pred['model']}")
    return out


def format_report(report: dict) -> str:
    """The report as the text `edgeflow inspect` prints."""
    m, t = report["model"], report["target"]
    lines = [report["package"],
             f"  model      {m.get('name')}" + (f" (width {m['width']})" if m.get("width") else "")
             + f", input {report['input'][0]}x{report['input'][1]}, {report['precision']}",
             f"  target     {t.get('name')} ({_target_text(t)})",
             f"  integrity  manifest sha256 {report['manifest_sha256']}, "
             + (f"signed by key {report['signer']}" if report["signer"] else "unsigned")]
    acc = report.get("accuracy")
    if acc:
        lines.append(f"  accuracy   EPE {acc['epe_vs_torch']} px vs the torch model "
                     f"(tolerance {acc.get('tolerance')} px, {acc.get('measured_on', '?')})")
    lines.append("  files      " + ", ".join(f"{n} {_size(s)}" for n, s in report["files"].items()))
    lines += _cost_lines(report.get("cost"), report.get("pruning"))
    lines += _quantization_lines(report.get("quantization"), (acc or {}).get("validation"))
    if "kernels" not in report:
        lines.append(f"  note       {report['note']}")
        return "\n".join(lines)
    b = report["board"]
    lines.append(f"  board      {b['description']}: {b['sm_count']} SMs, fp32 {b['peak_fp32_tflops']} TFLOPS, "
                 f"fp16 {b['peak_fp16_tflops']} TFLOPS, {b['memory_bandwidth_gbs']} GB/s")
    lines.append("")
    lines += _kernel_table(report["kernels"])
    s = report["summary"]
    hand = f"; hand-written: {', '.join(s['hand_written'])}" if s["hand_written"] else ""
    lines += ["", f"summary: {s['kernels']} kernels ({s['launches']} launches per inference), max registers "
                  f"{s['max_registers']}, total spills {s['spill_bytes']} B, max shared memory "
                  f"{_size(s['max_shared_bytes'])}{hand}"]
    conv = s["convolutions"]
    if conv is None:
        lines.append("tensor cores: unknown (the SASS was not read at compile time: `make sass-tools`, sm_75 or newer)")
    else:
        lines.append(f"tensor cores (from the SASS): {conv['tensor_core_kernels']} of {conv['kernels']} convolution "
                     f"kernels, {conv['tensor_core_flops_share']:.0%} of their FLOPs")
    if s["predicted_ms"] is not None:
        lo, hi = s["predicted_range_ms"]
        kinds = ", ".join(f"{kind.replace('_', ' ')} {v[0]:.2f}-{v[1]:.2f}"
                          for kind, v in s["predicted_by_kind_ms"].items())
        lines.append(f"{PREDICTION}: {lo:.2f} to {hi:.2f} ms per inference ({1e3 / hi:.0f} to {1e3 / lo:.0f} fps), "
                     f"about {s['predicted_ms']:.2f} ms, on {b['name']} ({s['flops'] / 1e9:.3f} GFLOP, "
                     f"{s['bytes'] / 1e6:.2f} MB; ms by kind: {kinds})")
        lines.append(f"  model: {s['prediction'].split(': ', 1)[1]}")
        lines.append(f"  at 100 % of every peak (roofline, a bound no kernel reaches): {s['roofline_ms']:.3f} ms")
    else:
        lines.append(f"{PREDICTION}: not available, the package has no FLOP/byte counts (recompile it)")
    return "\n".join(lines)


def _convolutions(kernels: list[dict]) -> dict | None:
    """Convolution kernels, those on tensor cores (read from the SASS) and their share of the
    convolutions' FLOPs; None when the SASS of the package was not read."""
    convs = [k for k in kernels if "conv2d" in k["name"]]
    if not convs or any(k["units"] is None for k in convs):
        return None
    tc = [k for k in convs if k["units"] == "tensor core"]
    total = sum((k["flops"] or 0) * k["launches"] for k in convs)
    return {"kernels": len(convs), "tensor_core_kernels": len(tc),
            "tensor_core_flops_share": round(sum((k["flops"] or 0) * k["launches"] for k in tc) / total, 4)
            if total else None}


NAME_WIDTH = 50  # longer (fused) kernel names are shortened in the table, not in the JSON


def _kernel_table(kernels: list[dict]) -> list[str]:
    width = min(NAME_WIDTH, max([len(k["name"]) for k in kernels] + [6]))
    head = (f"{'kernel':<{width}} {'op':<11} {'calls':>5} {'grid':>9} {'block':>8} {'regs':>4} {'spill':>5} "
            f"{'smem':>7} {'occ':>4} {'limit':<6} {'units':<11} {'MFLOP':>9} {'kB':>8} {'peak us':>9} "
            f"{'predicted us':>15} kind")
    rows = [head]
    for k in kernels:
        occ = f"{k['occupancy']:.0%}" if k["occupancy"] is not None else "-"
        name = k["name"] if len(k["name"]) <= width else k["name"][:width - 3] + "..."
        rows.append(f"{name:<{width}} {k['op'] or '-':<11} {k['launches']:>5} {_dims(k['grid']):>9} "
                    f"{_dims(k['block']):>8} {k['registers']:>4} {k['spill_stores'] + k['spill_loads']:>5} "
                    f"{k['shared_bytes']:>7} {occ:>4} {_limit(k['limited_by']):<6} {k['units'] or '?':<11} "
                    f"{_num(k['flops'], 1e6, '.2f'):>9} {_num(k['bytes'], 1e3, '.1f'):>8} "
                    f"{_num(k['roofline_us'], 1, '.2f'):>9} {_range(k['predicted_us']):>15} {k['kind'] or '-'}")
    return rows


def _range(r) -> str:
    return "-" if r is None else f"{r[0]:.1f}-{r[1]:.1f}"


def _pruning(entry: dict | None) -> dict | None:
    if not entry or not entry.get("ratio"):
        return None
    return {k: v for k, v in entry.items() if k != "channels"}


def _cost_lines(cost: dict | None, pruning: dict | None) -> list[str]:
    lines = []
    if cost:
        h, w = cost["input_size"]
        lines.append(f"  cost       {cost['parameters'] / 1e6:.3f} M parameters, {cost['macs'] / 1e9:.3f} GMAC "
                     f"({2 * cost['macs'] / 1e9:.3f} GFLOP) of convolutions per pair at {h}x{w}")
    if pruning:
        p, m, e = pruning["parameters"], pruning["macs"], pruning["epe_vs_unpruned"]
        lines.append(f"  pruning    {pruning['ratio']:g} of the channels ({pruning['importance']}): parameters "
                     f"x{p['after'] / p['before']:.2f}, MACs x{m['after'] / m['before']:.2f}; EPE vs the unpruned "
                     f"net {e['after_distillation']:.4f} px after {pruning['distillation']['steps']} distillation "
                     f"steps ({e['after_pruning']:.4f} px before)")
    return lines


def _quantization(q: dict | None) -> dict | None:
    """The manifest's quantization entry without the per-layer details: scheme, int8 layers,
    layers kept in float, calibration, and the int8 kernels with the integer dot-product
    instructions found in their machine code ("int8": True where there are any)."""
    if not q:
        return None
    dots = ("vpdpbusd", "sdot", "udot", "usdot")
    kernels = [{**k, "int8": any(k.get("instructions", {}).get(d) for d in dots)} for k in q.get("kernels") or []]
    return {"scheme": q.get("scheme"), "int8_layers": sorted(q.get("layers", {})),
            "kept_float": q.get("kept_float", {}), "calibration": q.get("calibration"), "kernels": kernels}


def _quantization_lines(q: dict | None, validation: dict | None) -> list[str]:
    if not q:
        return []
    int8 = [k for k in q["kernels"] if k["int8"]]
    ops = sorted({op for k in int8 for op in k["instructions"] if op in ("vpdpbusd", "sdot", "udot", "usdot")})
    lines = [f"  int8       {len(q['int8_layers'])} layers in int8 ({q['scheme']['weights']} weights, "
             f"{q['scheme']['activations']} activations); {len(int8)} of {len(q['kernels'])} int8 kernels use "
             f"integer dot products ({', '.join(ops) or 'none'})",
             f"             int8: {', '.join(q['int8_layers'])}",
             f"             kept float: {', '.join(q['kept_float'])}"]
    c = q.get("calibration") or {}
    lines.append(f"  calib      {c.get('pairs')} pairs at {'x'.join(map(str, c.get('size', [])))}, {c.get('method')} "
                 f"ranges, {c.get('data')}")
    if validation:
        lines.append(f"  validation EPE vs ground truth {validation['before']:.4f} px (float) -> "
                     f"{validation['after']:.4f} px (this package), {_share(validation['increase'])} "
                     f"(limit {_share(validation['max_increase'])})")
    return lines


def _share(v) -> str:
    return "none" if v is None else f"{v:+.1%}"


def _board(target: dict):
    from edgeflow import targets
    from edgeflow.errors import PackageError

    try:
        return targets.get(target["name"])
    except Exception:  # noqa: BLE001 - InputError listing the choices
        raise PackageError(f"the package's board {target.get('name')!r} is not in this edgeflow's targets table; "
                           f"choices: {', '.join(b for b in targets.names())}") from None


def _target_text(t: dict) -> str:
    parts = [t.get("kind", "?")]
    if t.get("cuda_arch"):
        parts += [t["cuda_arch"], f"CUDA {t.get('cuda_version')}"]
    parts.append(t.get("host_triple") or t.get("machine") or "this machine")
    return ", ".join(str(p) for p in parts)


def _dims(d) -> str:
    if not d:
        return "-"
    d = list(d)
    while len(d) > 1 and d[-1] == 1:
        d.pop()
    return "x".join(str(v) for v in d)


def _limit(name) -> str:
    return {"registers": "regs", "shared": "smem", "threads": "thread", "blocks": "blocks"}.get(name, name or "-")


def _num(value, scale: float, fmt: str) -> str:
    return "-" if value is None else format(value / scale, fmt)


def _size(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
