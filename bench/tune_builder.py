"""MetaSchedule's LocalBuilder against edgeflow's warm builder, on the same candidates.

    python bench/tune_builder.py local|warm [--batches 2]

Candidates: the hand-scheduled flownet2-s conv2 (64x64), 4 per batch, as MetaSchedule would
send them. Prints the seconds per batch and how many built; `tvm.compile` of one for scale.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("builder", choices=("local", "warm"))
    ap.add_argument("--batches", type=int, default=2)
    args = ap.parse_args()

    import torch
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from edgeflow import targets
    from edgeflow.compile import cpu_schedules, tune
    from edgeflow.models import create

    torch.manual_seed(0)
    board = targets.get("host")
    target = board.tvm_target()
    mod = tune.fused_module(create("flownet2-s", weights=None), (64, 64), board)
    func = tune.select_tasks(mod, target, "fused_conv2d1_add2_leaky_relu1")["fused_conv2d1_add2_leaky_relu1"]
    candidate = cpu_schedules.schedule(tune.workload(func), target)
    t0 = time.time()
    tvm.compile(candidate, target=target)
    print(f"tvm.compile of one candidate: {time.time() - t0:.2f} s")
    builder = ms.builder.LocalBuilder(timeout_sec=30) if args.builder == "local" else tune.warm_builder()
    inputs = [ms.builder.BuilderInput(candidate, target)] * 4
    for batch in range(args.batches):
        t0 = time.time()
        results = builder.build(inputs)
        errors = [r.error_msg.strip().splitlines()[-1] for r in results if r.error_msg]
        print(f"{args.builder} batch {batch}: {time.time() - t0:.1f} s, {len(results) - len(errors)}/{len(results)} "
              f"built{'; ' + errors[0] if errors else ''}")
    if args.builder == "warm":
        builder.shutdown()


if __name__ == "__main__":
    main()
