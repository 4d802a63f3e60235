"""`edgeflow adapt` on a generated clip of a domain the shipped weights never saw, scored against
the clip's exact ground truth (which adapt never sees), and on ../shared/realflow.

    .venv/bin/python bench/adapt.py --json

The clip is `edgeflow.synth.video_frames` (a continuous scene; its background pans) without the
generator's own photometric changes, then fogged, blurred and colour-cast, identically in every
frame (row-dependent haze, Gaussian blur, per-channel gains, a little sensor noise; `--blur`,
`--haze` and `--noise` set how strong), so the ground truth flow is unchanged. `adapt` trains on the first 80 % of the frames; the EPE of consecutive
pairs of the last 20 % is measured before (the starting weights) and after, with OpenCV
DIS-medium on the same pairs as the peer. Then `edgeflow.evaluate` on ../shared/realflow with
the starting and the adapted weights (evaluation data: never adapted on).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REALFLOW = ROOT.parent / "shared" / "realflow"
BLUR, FOG, NOISE = 1.0, (0.35, 0.6), 0.7  # Gaussian sigma (px), haze density bottom..top, noise sigma


def new_domain(img: np.ndarray, noise: np.random.Generator, blur: float = BLUR, fog=FOG,
               sigma: float = NOISE) -> np.ndarray:
    """Haze (denser towards the top), blur, a warm colour cast and sensor noise: the same change in
    every frame but the noise, so the flow stays what the generator says."""
    h = img.shape[0]
    f = cv2.GaussianBlur(img.astype(np.float32), (0, 0), blur)
    density = np.linspace(fog[1], fog[0], h, dtype=np.float32)[:, None, None]
    f = f * (1 - density) + np.float32([205, 200, 185]) * density
    f = f * np.float32([0.78, 1.0, 1.18]) + noise.normal(0, sigma, f.shape).astype(np.float32)
    return np.clip(f + 0.5, 0, 255).astype(np.uint8)


def make_clip(out_dir: Path, count: int, size: tuple[int, int], seed: int, domain: dict | None = None):
    """Write the clip's frames as PNGs; returns (frames, flows, the frames before the domain change)
    with flows[t] from frame t to t+1."""
    from edgeflow.synth import video_frames

    noise = np.random.default_rng([seed, 1])
    frames, flows, clean = [], [], []
    for n, (img, flow) in enumerate(video_frames(np.random.default_rng(seed), count, size, photometric=False)):
        clean.append(img)
        img = new_domain(img, noise, **(domain or {}))
        cv2.imwrite(str(out_dir / f"frame_{n:04d}.png"), img)
        frames.append(img)
        flows.append(flow)
    return frames, flows, clean


def clip_epe(fn, frames, flows) -> float:
    from edgeflow.metrics import epe

    return float(np.mean([epe(fn(frames[t], frames[t + 1]), flows[t]) for t in range(len(frames) - 1)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flownet2-s")
    p.add_argument("--frames", type=int, default=60, help="frames in the clip")
    p.add_argument("--size", default="384x512", help="HxW of the clip")
    p.add_argument("--seed", type=int, default=11, help="seed of the clip")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: adapt's)")
    p.add_argument("--blur", type=float, default=BLUR, help="Gaussian blur sigma (px) of the new domain")
    p.add_argument("--haze", default=f"{FOG[0]},{FOG[1]}", help="haze density at the bottom,top")
    p.add_argument("--noise", type=float, default=NOISE, help="sensor noise sigma (0..255 scale)")
    p.add_argument("--seconds", type=float, default=None, help="time budget of the adaptation")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lr-decay", action=argparse.BooleanOptionalAction, default=None,
                   help="halve the lr at 60, 80 and 90 %% of the run (default: adapt's)")
    p.add_argument("--ema", type=float, default=None, help="decay of the weight average that is written")
    p.add_argument("--distill", type=float, default=None)
    p.add_argument("--smooth", type=float, default=None)
    p.add_argument("--loss", default=None)
    p.add_argument("--proposals", default=None,
                   help="comma list of dis-medium, dis-fast, dis-fine; or none (photometric only)")
    p.add_argument("--label", type=float, default=None, help="weight of the pseudo-label term")
    p.add_argument("--label-window", type=int, default=None, help="side (px) of the fusion's comparison box")
    p.add_argument("--label-unsure", type=float, default=None,
                   help="weight of label pixels that fail the forward-backward check")
    p.add_argument("--photo", type=float, default=None, help="weight of the photometric term")
    p.add_argument("--replay", type=int, default=None, help="generated pairs with exact flow per step")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=str(ROOT / "out" / "bench" / "adapted.pt"))
    p.add_argument("--no-realflow", action="store_true", help="skip ../shared/realflow")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from edgeflow.adapt import adapt
    from edgeflow.baselines import baseline
    from edgeflow.evaluate import evaluate, model_flow
    from edgeflow.models import create

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    h, w = (int(v) for v in args.size.split("x"))
    knobs = {k: getattr(args, k) for k in ("steps", "lr", "distill", "smooth", "loss", "proposals", "label", "photo",
                                           "label_window", "label_unsure", "replay", "lr_decay", "ema")
             if getattr(args, k) is not None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = {"command": "bench/adapt.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        fog = tuple(float(v) for v in args.haze.split(","))
        frames, flows, clean = make_clip(Path(tmp), args.frames, (h, w), args.seed,
                                         {"blur": args.blur, "fog": fog, "sigma": args.noise})
        speed = float(np.mean([np.hypot(*f.transpose(2, 0, 1)).mean() for f in flows[:-1]]))
        report["clip"] = {"frames": args.frames, "size": [h, w], "seed": args.seed, "mean_speed_px": speed,
                          "blur_sigma": args.blur, "haze": fog, "noise_sigma": args.noise, "seconds": round(time.time() - t0, 1)}
        result = adapt(args.model, tmp, args.out, seconds=args.seconds, batch=args.batch,
                       progress=not args.json, **knobs)
    held = slice(result.train_frames, None)
    before = model_flow(create(args.model))
    after = model_flow(create(args.model, weights=args.out))
    epe_before = clip_epe(before, frames[held], flows[held])
    epe_after = clip_epe(after, frames[held], flows[held])
    report["adapt"] = {k: v for k, v in result.to_dict().items() if k != "sha256"}
    report["heldout_epe"] = {"pairs": result.heldout_pairs, "before": epe_before, "after": epe_after,
                             "change": epe_after / epe_before - 1,
                             "before_without_domain_change": clip_epe(before, clean[held], flows[held]),
                             "dis_medium": clip_epe(baseline("dis-medium"), frames[held], flows[held]),
                             "zero_flow": clip_epe(lambda a, b: np.zeros((*a.shape[:2], 2), np.float32),
                                                   frames[held], flows[held])}
    report["trained_frames_epe"] = {"before": clip_epe(before, frames[:result.train_frames], flows),
                                    "after": clip_epe(after, frames[:result.train_frames], flows)}
    if not args.no_realflow and REALFLOW.is_dir():
        rb = evaluate(args.model, REALFLOW, progress=False)
        ra = evaluate(args.model, REALFLOW, weights=args.out, progress=False)
        report["realflow"] = {"before": {"epe": rb["epe"], **{k: v["epe"] for k, v in rb["sets"].items()}},
                              "after": {"epe": ra["epe"], **{k: v["epe"] for k, v in ra["sets"].items()}},
                              "change": ra["epe"] / rb["epe"] - 1}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        e = report["heldout_epe"]
        print(f"held-back EPE {e['before']:.3f} -> {e['after']:.3f} px ({100 * e['change']:+.1f} %), "
              f"DIS-medium {e['dis_medium']:.3f}, zero flow {e['zero_flow']:.3f}")
        if "realflow" in report:
            r = report["realflow"]
            print(f"realflow EPE {r['before']['epe']:.3f} -> {r['after']['epe']:.3f} ({100 * r['change']:+.1f} %)")
        print(result.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
