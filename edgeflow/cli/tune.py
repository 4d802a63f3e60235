"""`edgeflow tune [MODEL] --target T`: a thin shell over `edgeflow.compile.tune.tune`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_cmd)


def tune_cmd(
    model: str = typer.Argument("flownet2-s", help="Registry name (see `edgeflow models`)."),
    target: str = typer.Option("host", "--target", "-t", help="CPU target (see `edgeflow targets`)."),
    size: str = typer.Option("448x1024", help="Network input size HxW (the size you will compile)."),
    trials: int = typer.Option(64, help="Candidates measured per task (a rerun adds what is missing)."),
    db: str = typer.Option(None, "--db", help="Tuning database directory (default: tuning/MODEL-TARGET-HxW)."),
    tasks: str = typer.Option("auto", help="auto (the kernels the hand schedules cover badly), all, or "
                                           "kernel names, comma-separated."),
    rpc_tracker: str = typer.Option(None, "--rpc-tracker", metavar="HOST:PORT",
                                    help="Measure on devices registered with this TVM RPC tracker."),
    rpc_key: str = typer.Option(None, "--rpc-key", help="The key the devices registered with (rpc_server --key)."),
    cores: int = typer.Option(None, help="The device's CPU cores, for targets that do not name them."),
    background: bool = typer.Option(False, "--background", help="Detach; progress goes to DB/tune.log."),
) -> None:
    """Tune MODEL's weak kernels for TARGET with MetaSchedule; `edgeflow compile --tuning-db DB` applies them."""
    import time

    from edgeflow.cli.options import parse_size
    from edgeflow.compile.tune import parse_tracker, tune
    from edgeflow.errors import InputError
    from edgeflow.models import spec

    spec(model)
    h, w = parse_size(size)
    if rpc_tracker is not None:
        parse_tracker(rpc_tracker, "--rpc-tracker")
    if (rpc_tracker is None) != (rpc_key is None):
        raise InputError("--rpc-tracker and --rpc-key go together")
    db = db or f"tuning/{model}-{target}-{h}x{w}"
    if background:
        args = ["tune", model, "--target", target, "--size", f"{h}x{w}", "--trials", str(trials), "--db", db,
                "--tasks", tasks]
        args += ["--rpc-tracker", rpc_tracker, "--rpc-key", rpc_key] if rpc_tracker else []
        args += ["--cores", str(cores)] if cores else []
        _detach(db, args)
        return
    t0 = time.time()
    result = tune(model, target=target, input_size=(h, w), db=db, trials=trials, tasks=tasks, rpc_tracker=rpc_tracker,
                  rpc_key=rpc_key, cores=cores,
                  progress=lambda msg: typer.echo(f"[{time.time() - t0:7.1f}s] {msg}", err=True))
    typer.echo(result.summary())


def _detach(db: str, args: list[str]) -> None:
    """Run `edgeflow ARGS` in a new session, its output appended to DB/tune.log."""
    import subprocess
    import sys
    from pathlib import Path

    log = Path(db) / "tune.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from edgeflow.cli import main; sys.exit(main())",
                                 *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    typer.echo(f"tuning in the background (pid {proc.pid}); progress: tail -f {log}; stop it with kill {proc.pid} "
               f"and rerun the command to resume")
