"""`edgeflow adapt MODEL --frames DIR|URI -o adapted.pt`: a thin shell over `edgeflow.adapt.adapt`."""

from __future__ import annotations

import typer

from edgeflow.adapt import AdaptConfig

D = AdaptConfig()  # the defaults: the API's, in one place


def register(app: typer.Typer) -> None:
    app.command("adapt")(adapt_cmd)


def adapt_cmd(
    model: str = typer.Argument("flownet2-s", help="Registry name (flownet2-s, flownet2-ss, ...)."),
    frames: str = typer.Option(..., "--frames", metavar="DIR|URI",
                               help="Your unlabelled footage: a directory or glob of frames, a video file, "
                                    "or a source URI (file://, rtsp://, v4l2://, csi://)."),
    out: str = typer.Option(..., "-o", "--out", help="Weight file to write (load it with --weights)."),
    weights: str = typer.Option("default", "--weights", help="Starting weights: default (shipped) or a weight file."),
    steps: int = typer.Option(D.steps, "--steps", help="Optimiser steps."),
    seconds: float = typer.Option(None, "--time", metavar="SECONDS", help="Stop after this many seconds of training."),
    batch: int = typer.Option(D.batch, "--batch", help="Frame pairs per step."),
    crop: str = typer.Option("x".join(map(str, D.crop)), "--crop", help="HxW training crop, multiples of 64."),
    size: str = typer.Option(None, "--size", help="HxW the frames are resized to, multiples of 64 "
                                                  "(default: their size rounded up)."),
    lr: float = typer.Option(D.lr, "--lr", help="Adam learning rate."),
    lr_decay: bool = typer.Option(D.lr_decay, "--lr-decay/--constant-lr",
                                  help="Halve the learning rate at 60, 80 and 90 % of the steps or of --time."),
    loss: str = typer.Option(D.loss, "--loss", help="Photometric loss: census or ssim (SSIM + L1)."),
    distill: float = typer.Option(D.distill, "--distill", help="Weight of the pull towards the starting network."),
    proposals: str = typer.Option(D.proposals, "--proposals",
                                  help="Classical flows fused with the network's into pseudo-labels: one or a "
                                       "comma list of dis-medium, dis-fast, dis-fine; or none (photometric loss "
                                       "only)."),
    label: float = typer.Option(D.label, "--label", help="Weight of the pull towards the pseudo-labels."),
    replay: int = typer.Option(D.replay, "--replay",
                               help="Generated pairs with exact flow in each step, which hold the network on "
                                    "other footage (0: none)."),
    holdout: float = typer.Option(D.holdout, "--holdout",
                                  help="Share of the footage (its end) held back for the report."),
    max_frames: int = typer.Option(D.max_frames, "--max-frames", help="Frames read from the source."),
    no_skip: bool = typer.Option(False, "--no-skip", help="Consecutive pairs only (no pairs one frame apart)."),
    seed: int = typer.Option(D.seed, "--seed", help="Seed of the crops and pair order."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a line."),
) -> None:
    """Fine-tune MODEL on your own footage without ground truth (photometric, self-supervised)."""
    import json

    from edgeflow.adapt import adapt
    from edgeflow.cli.options import parse_size

    result = adapt(model, frames, out, weights=weights, steps=steps, seconds=seconds, batch=batch,
                   crop=parse_size(crop, "--crop"), size=parse_size(size) if size else None, lr=lr,
                   lr_decay=lr_decay, loss=loss, distill=distill, proposals=proposals, label=label, replay=replay,
                   holdout=holdout, max_frames=max_frames, skip=not no_skip, seed=seed, progress=not json_out)
    typer.echo(json.dumps(result.to_dict(), indent=1) if json_out else result.format())
