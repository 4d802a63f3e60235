"""`edgeflow import-weights FILE --model NAME -o OUT`: official FlowNet2 weights -> edgeflow file."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("import-weights")(import_weights_cmd)


def import_weights_cmd(
    file: str = typer.Argument(..., help="Official weights: .caffemodel, .caffemodel.h5, or a "
                                         "flownet2-pytorch checkpoint (.pth.tar)."),
    model: str = typer.Option(..., "--model", "-m", help="Registry name the weights are for (see `edgeflow models`)."),
    out: str = typer.Option(..., "-o", "--out", help="edgeflow weight file to write (e.g. flownet2-s.pt)."),
    half: bool = typer.Option(False, "--half", help="Store fp16 (half the size) instead of the exact fp32 values."),
) -> None:
    """Convert official weights (Caffe or flownet2-pytorch) into an edgeflow weight file."""
    from edgeflow.models.importers import import_weights

    r = import_weights(file, model, out, half=half)
    meta = r["meta"]
    typer.echo(f"{r['out']}: {model} from {meta['source']} ({meta['source_format']}), "
               f"{r['params'] / 1e6:.2f}M parameters, sha256 {r['sha256'][:16]}")
    if meta.get("caffe_mean_rgb"):
        means = ", ".join(f"{image} RGB {' '.join(f'{v:.3f}' for v in rgb)}"
                          for image, rgb in meta["caffe_mean_rgb"].items())
        typer.echo(f"note: the file keeps Caffe's fixed input means ({means}); models loaded from it subtract them")
    typer.echo(f"use it with --weights {r['out']} or edgeflow.models.create({model!r}, weights={r['out']!r})")
