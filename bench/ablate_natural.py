"""What each ingredient of the natural synthetic style does to a network trained on it.

    .venv/bin/python bench/ablate_natural.py --steps 400 --runs /work/runs/ablate   # one row per variant

Each variant fine-tunes the shipped flownet2-s for the same number of steps on natural-style
pairs only (`edgeflow train --init default --natural 1`), the same seed and schedule, with one
ingredient left out (`--natural-without X`, `edgeflow.synth_natural.INGREDIENTS`); "full" leaves
nothing out, "chairs" trains on the default style instead, and "full (seed 1)" repeats "full"
with other pairs, which gives the noise floor of the comparison. The weight average after the
last step is evaluated on the chairs held-out set (the old generator's, 64 pairs 384x512), the
natural held-out set, and every set of ../shared/realflow. Rows are appended to
RUNS/ablation.jsonl as they finish; variants already there are skipped, so an interrupted run
resumes with the next variant. `--table` prints the Markdown table of the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REALFLOW = ROOT.parent / "shared" / "realflow"
SETS = ("middlebury", "sintel-clean", "sintel-final", "kitti")


def variants() -> list[tuple[str, dict]]:
    """(name, TrainConfig overrides) in the order they run."""
    from edgeflow.synth_natural import INGREDIENTS

    out = [("full", {})]
    out += [(f"without {i}", {"natural_without": (i,)}) for i in INGREDIENTS]
    out += [("chairs", {"natural": 0.0}), ("full (seed 1)", {"seed": 1})]
    return out


def run_variant(name: str, overrides: dict, steps: int, runs: Path) -> dict:
    from edgeflow.evaluate import evaluate
    from edgeflow.training import TrainConfig, train

    config = TrainConfig(model="flownet2-s", steps=steps, batch=8, lr=1e-4, curriculum=[[0, 256, 320]],
                         init="default", natural=1.0, eval_every=steps, workers=1)
    for key, value in overrides.items():
        setattr(config, key, value)
    out = runs / "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    t0 = time.time()
    last = train(config, out, progress=False)
    row = {"variant": name, "steps": steps, "chairs_heldout": last["heldout_epe"],
           "natural_heldout": last.get("heldout_natural_epe"), "train_s": round(time.time() - t0)}
    if row["natural_heldout"] is None:  # trained on chairs only: its log has no natural figure
        from edgeflow.models import create
        from edgeflow.training import evaluate_pairs, heldout_set

        net = create("flownet2-s", weights=out / "best.pt").eval()
        row["natural_heldout"] = round(evaluate_pairs(net, heldout_set(64, (384, 512), style="natural")), 4)
    real = evaluate("flownet2-s", REALFLOW, weights=out / "best.pt", progress=False)
    row["realflow"] = round(real["epe"], 4)
    row.update({s: round(real["sets"][s]["epe"], 4) for s in SETS if s in real["sets"]})
    return row


def table(rows: list[dict]) -> str:
    head = ["variant", "chairs held-out", "natural held-out", "Middlebury", "Sintel clean", "Sintel final", "KITTI",
            "realflow, all"]
    keys = ["chairs_heldout", "natural_heldout", *SETS, "realflow"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["variant"]] + [f"{r[k]:.3f}" if k in r else "-" for k in keys]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--runs", default=str(ROOT / "out" / "ablate"), help="directory of the runs and ablation.jsonl")
    p.add_argument("--only", default=None, help="comma-separated variant names to run")
    p.add_argument("--table", action="store_true", help="print the table of the finished rows and exit")
    args = p.parse_args(argv)

    import torch

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "ablation.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if args.table:
        print(table(rows))
        return 0
    torch.set_num_threads(1)
    done = {r["variant"] for r in rows}
    only = set(args.only.split(",")) if args.only else None
    for name, overrides in variants():
        if name in done or (only and name not in only):
            continue
        row = run_variant(name, overrides, args.steps, runs)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
