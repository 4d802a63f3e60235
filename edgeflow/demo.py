"""`make demo`: compile the bundled model for the Jetson and for this CPU, then run the host
package on a generated clip, writing colour-coded flow to OUT_DIR and a summary with EPE
against the clip's ground truth next to OpenCV DIS.

    python -m edgeflow.demo OUT_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

SIZE = (256, 320)
FRAMES = 12


def main(out_dir: str = "out") -> dict:
    import cv2
    import numpy as np

    from edgeflow import epe, flow_to_color, read_flow
    from edgeflow.baselines import baseline
    from edgeflow.compile import compile
    from edgeflow.models.weights import shipped
    from edgeflow.runtime import load
    from edgeflow.synth import write_video

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = "default" if "flownet2-s" in shipped() else "random"
    if weights == "random":
        print("warning: no trained flownet2-s weights ship in this checkout; using random weights", file=sys.stderr)
    clip = write_video(out / "clip", FRAMES, size=SIZE, seed=7, progress=False)
    packages = {}
    for target in ("jetson", "host"):
        t0 = time.time()
        packages[target] = compile("flownet2-s", target=target, input_size=SIZE, weights=weights,
                                   out=out / f"flownet2-s-{target}.tar").path
        print(f"compiled {packages[target]} in {time.time() - t0:.1f}s")
    engine = load(packages["host"])
    dis = baseline("dis-medium")
    frames = sorted((clip / "frames").glob("frame_*.png"))
    (out / "flow").mkdir(exist_ok=True)
    errs, dis_errs = [], []
    for i, (f1, f2) in enumerate(zip(frames, frames[1:])):
        img1, img2 = cv2.imread(str(f1)), cv2.imread(str(f2))
        flow = engine(img1, img2)
        gt = read_flow(clip / "flow" / f"{f1.stem}.flo")
        errs.append(epe(flow, gt))
        dis_errs.append(epe(dis(img1, img2), gt))
        cv2.imwrite(str(out / "flow" / f"flow_{i:04d}.png"), np.concatenate([img1, flow_to_color(flow)], 1))
    summary = {"pairs": len(errs), "epe": {"edgeflow-host": round(float(np.mean(errs)), 3),
                                           "dis-medium": round(float(np.mean(dis_errs)), 3)},
               "weights": weights, "packages": {k: str(v) for k, v in packages.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(*sys.argv[1:2])
