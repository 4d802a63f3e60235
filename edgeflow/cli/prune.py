"""`edgeflow prune MODEL --ratio 0.3 -o pruned.pt`: a thin shell over `edgeflow.compile.prune`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_cmd)


def prune_cmd(
    model: str = typer.Argument("flownet2-s", help="Registry name (see `edgeflow models`)."),
    ratio: float = typer.Option(..., "--ratio", help="Share of channels each prunable layer loses, e.g. 0.3."),
    out: str = typer.Option(..., "-o", "--out", help="Weight file to write (load it with --weights)."),
    weights: str = typer.Option("default", help="default (shipped), a checkpoint shipped beside it (see "
                                                "`edgeflow models`), random (untrained), or a weight file."),
    importance: str = typer.Option("l1", help="Channel importance: l1 (weight norm) or taylor (first-order)."),
    calib: str = typer.Option(None, "--calib", help="Directory of your own video frames to distil on "
                                                    "(default: generated pairs)."),
    steps: int = typer.Option(200, "--steps", help="Distillation steps (0: none)."),
    batch: int = typer.Option(4, "--batch", help="Pairs per distillation step."),
    lr: float = typer.Option(1e-4, "--lr", help="Adam learning rate of the distillation (cosine decay)."),
    size: str = typer.Option("256x320", "--size", help="HxW of the distillation and validation pairs, multiples of 64."),
    round_to: int = typer.Option(8, "--round-to", help="Keep channel counts multiples of this (1: any count); "
                                                       "vector kernels run faster on multiples of 8."),
    natural: float = typer.Option(0.0, "--natural", help="Share of generated distillation pairs in the natural "
                                                         "style (0..1)."),
    truth: float = typer.Option(0.0, "--truth", help="Weight of the loss against the generated pairs' ground "
                                                     "truth (0: distil from the unpruned net only)."),
    checkpoint_minutes: float = typer.Option(10.0, "--checkpoint-minutes",
                                             help="Write the student to OUT this often while it distils."),
    seed: int = typer.Option(0, "--seed", help="Seed of the distillation data."),
    resume: bool = typer.Option(False, "--resume", help="OUT is a checkpoint of this run: go on distilling it "
                                                        "up to --steps."),
) -> None:
    """Remove whole channels of MODEL by importance, distil it from the unpruned net, write its weights."""
    import time

    from edgeflow.cli.options import parse_size
    from edgeflow.compile.prune import prune, save
    from edgeflow.models import create, spec

    spec(model)
    t0 = time.time()
    start = create(model, weights=out) if resume else None
    pruned = prune(create(model, weights=None if weights == "random" else weights), ratio, importance=importance,
                   calibration=calib, distill_steps=steps, batch=batch, lr=lr, size=parse_size(size),
                   round_to=round_to, natural=natural, truth=truth, seed=seed,
                   progress=lambda msg: typer.echo(f"[{time.time() - t0:6.1f}s] {msg}", err=True),
                   checkpoint=lambda student: save(student, model, out), checkpoint_s=checkpoint_minutes * 60,
                   resume=start)
    save(pruned, model, out)
    r = pruned.pruning
    p, m, e = r["parameters"], r["macs"], r["epe_vs_unpruned"]
    typer.echo(f"{out}: {model} pruned {ratio:g} ({importance}): parameters {p['before'] / 1e6:.2f} M -> "
               f"{p['after'] / 1e6:.2f} M, MACs {m['before'] / 1e9:.3f} G -> {m['after'] / 1e9:.3f} G at "
               f"{m['input_size'][0]}x{m['input_size'][1]}, EPE vs unpruned {e['after_distillation']:.4f} px "
               f"after {r['distillation']['steps']} distillation steps ({e['after_pruning']:.4f} px before)")
