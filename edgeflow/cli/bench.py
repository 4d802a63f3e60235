"""`edgeflow bench PACKAGE --vs onnxruntime,torch`: a thin shell over `edgeflow.benchmark.bench`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)


def bench_cmd(
    package: str = typer.Argument(..., metavar="PACKAGE", help="Compiled package (.tar) for this machine."),
    vs: str = typer.Option("onnxruntime,torch", "--vs", help="Peers running the same network: onnxruntime, torch."),
    threads: int = typer.Option(None, "--threads", help="Threads for every framework (default: every physical core)."),
    runs: int = typer.Option(10, "--runs", help="Timed rounds; the medians are reported."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed rounds first (the first is checked against torch)."),
    spin: bool = typer.Option(True, "--spin/--no-spin",
                              help="Thread pools spin between kernels as in production, each call timed once the "
                                   "process is idle again (default); or no pool spins at all."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    rpc_tracker: str = typer.Option(None, "--rpc-tracker", metavar="HOST:PORT",
                                    help="Run on a device registered with this TVM RPC tracker (no peers)."),
    rpc_key: str = typer.Option(None, "--rpc-key", help="The key the device registered with (rpc_server --key)."),
) -> None:
    """Network time of PACKAGE against ONNX Runtime and PyTorch on the same network, input size and threads."""
    import json
    import time

    from edgeflow.benchmark import bench

    t0 = time.time()
    if rpc_tracker is not None or rpc_key is not None:
        _remote(package, rpc_tracker, rpc_key, runs, warmup, json_out, t0)
        return
    r = bench(package, vs=vs, threads=threads, runs=runs, warmup=warmup, spin=spin,
              progress=lambda msg: typer.echo(f"[{time.time() - t0:6.1f}s] {msg}", err=True))
    if r["threads"]["edgeflow"] != r["threads"]["requested"]:
        typer.echo(f"warning: the TVM runtime uses {r['threads']['edgeflow']} threads, not {r['threads']['requested']}",
                   err=True)
    if json_out:
        typer.echo(json.dumps(r, indent=1))
        return
    h, w = r["input_size"]
    typer.echo(f"{r['model']} {h}x{w} {r['precision']} on {r['target']} ({r['device']}), "
               f"{r['threads']['requested']} threads, {'pools spin' if r['spin'] else 'no pool spins'}, "
               f"median of {r['runs']} runs")
    typer.echo(f"{'':<13}{'ms':>10}{'min':>10}{'max':>10}{'cpu ms':>10}{'threads':>9}{'edgeflow/x':>12}")
    for name, ms in r["ms"].items():
        s = r["stats"][name]
        ratio = f"{r['ratio'][name]:>12.2f}" if name in r["ratio"] else f"{'':>12}"
        typer.echo(f"{name:<13}{ms:>10.1f}{s['min_ms']:>10.1f}{s['max_ms']:>10.1f}{s['cpu_ms']:>10.1f}"
                   f"{r['effective_threads'][name]:>9.2f}{ratio}")
    st = r["edgeflow_stages_ms"]
    typer.echo(f"edgeflow end to end {r['edgeflow_end_to_end_ms']:.1f} ms (prepare {st['prepare']:.1f} + network "
               f"{st['network']:.1f} + finish {st['finish']:.1f}); EPE vs torch: "
               + ", ".join(f"{k} {v:.2g} px" for k, v in r["epe_vs_torch"].items()))


def _remote(package, rpc_tracker, rpc_key, runs, warmup, json_out, t0) -> None:
    import json
    import time

    from edgeflow.benchmark import bench_remote
    from edgeflow.compile.tune import parse_tracker
    from edgeflow.errors import InputError

    if rpc_tracker is None or rpc_key is None:
        raise InputError("--rpc-tracker and --rpc-key go together")
    parse_tracker(rpc_tracker, "--rpc-tracker")
    r = bench_remote(package, rpc_tracker=rpc_tracker, rpc_key=rpc_key, runs=runs, warmup=warmup,
                     progress=lambda msg: typer.echo(f"[{time.time() - t0:6.1f}s] {msg}", err=True))
    if json_out:
        typer.echo(json.dumps(r, indent=1))
        return
    h, w = r["input_size"]
    s = r["stats"]["edgeflow"]
    typer.echo(f"{r['model']} {h}x{w} {r['precision']} on {r['device']}, median of {r['runs']} runs: "
               f"{s['median_ms']:.1f} ms (min {s['min_ms']:.1f}, max {s['max_ms']:.1f}); EPE vs torch "
               f"{r['epe_vs_torch']['edgeflow']:.2g} px")
