"""`edgeflow train MODEL --out DIR`: train on synthetic pairs, resuming where DIR left off."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)


def parse_curriculum(text: str) -> list[list[int]]:
    """'0:256x320,20000:320x448' -> [[0, 256, 320], [20000, 320, 448]]."""
    from edgeflow.errors import InputError

    out = []
    try:
        for part in text.split(","):
            step, size = part.split(":")
            h, w = size.lower().split("x")
            out.append([int(step), int(h), int(w)])
    except ValueError:
        raise InputError(f"--curriculum {text!r}: expected STEP:HxW[,STEP:HxW...], "
                         f"e.g. 0:256x320,20000:320x448") from None
    if out[0][0] != 0 or any(h <= 0 or w <= 0 or h % 64 or w % 64 for _, h, w in out):
        raise InputError(f"--curriculum {text!r}: must start at step 0 with sizes that are positive multiples of 64")
    return out


def train_cmd(
    model: str = typer.Argument(..., help="Registry name, e.g. flownet2-s."),
    out: str = typer.Option(..., "--out", help="Run directory (checkpoint, log); resumed if it exists."),
    steps: int = typer.Option(30000, help="Total optimiser steps."),
    batch: int = typer.Option(8, help="Pairs per step."),
    lr: float = typer.Option(4e-4, help="Adam learning rate before the decay steps."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Adam's L2 penalty."),
    curriculum: str = typer.Option("0:256x320,20000:320x448", help="STEP:HxW crop sizes."),
    scene: str = typer.Option("384x512", help="HxW render size of a training pair; the crops are cut from it."),
    seed: int = typer.Option(0, help="Seed of the model initialisation and the data."),
    workers: int = typer.Option(1, help="Data generation processes."),
    eval_every: int = typer.Option(1000, help="Steps between held-out evaluations and checkpoints."),
    init: str = typer.Option(None, "--init",
                             help="Start from these weights (a file, or 'default': the shipped ones) to fine-tune."),
    natural: float = typer.Option(0.0, "--natural",
                                  help="Fraction of pairs in the natural style (photographs, camera effects)."),
    natural_without: str = typer.Option("", "--natural-without", metavar="A,B",
                                        help="Natural-style ingredients to leave out: photos, spectral, bending, "
                                             "small-motion, pan, blur, atmosphere, sensor."),
    device: str = typer.Option("cpu", "--device", help="Train on cpu or cuda (an NVIDIA GPU)."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast for the forward and backward passes."),
    budget_minutes: float = typer.Option(None, "--budget-minutes",
                                         help="Stop after this much wall-clock time, with a checkpoint."),
    checkpoint_minutes: float = typer.Option(None, "--checkpoint-minutes",
                                             help="Also write the checkpoint this often between evaluations."),
    ship: bool = typer.Option(False, "--ship", help="Afterwards install best.pt as the model's shipped weights."),
) -> None:
    """Train MODEL on synthetic pairs generated on the fly (stacks: earlier stages frozen)."""
    import json

    from edgeflow.cli.options import parse_size
    from edgeflow.models import spec
    from edgeflow.training import TrainConfig, train

    from edgeflow.errors import InputError

    spec(model)
    if not 0.0 <= natural <= 1.0:
        raise InputError(f"--natural {natural}: expected a fraction between 0 and 1")
    without = tuple(sorted(v.strip() for v in natural_without.split(",") if v.strip()))
    if without:
        from edgeflow.synth_natural import check_without

        try:
            check_without(without)
        except InputError as e:
            raise InputError(f"--natural-without {natural_without}: {e}") from None
        if not natural:
            raise InputError(f"--natural-without {natural_without}: leaves ingredients out of natural-style pairs, "
                             f"but --natural is 0 (no such pairs)")
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: expected cpu or cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: torch sees no CUDA GPU on this machine")
    for flag, value in (("--budget-minutes", budget_minutes), ("--checkpoint-minutes", checkpoint_minutes)):
        if value is not None and not value > 0:
            raise InputError(f"{flag} {value}: expected a positive number of minutes")
    config = TrainConfig(model=model, steps=steps, batch=batch, lr=lr, weight_decay=weight_decay,
                         curriculum=parse_curriculum(curriculum), scene=parse_size(scene, "--scene"), seed=seed,
                         workers=workers, eval_every=eval_every, init=init, natural=natural,
                         natural_without=without, device=device, bf16=bf16)
    minutes = {"budget_s": budget_minutes, "checkpoint_s": checkpoint_minutes}
    last = train(config, out, **{k: v * 60 for k, v in minutes.items() if v is not None})
    typer.echo(json.dumps(last))
    if ship:
        from pathlib import Path

        from edgeflow.models.weights import ship_weights

        typer.echo(f"shipped {ship_weights(Path(out) / 'best.pt', model)}")
