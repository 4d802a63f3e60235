"""The runtime's DLPack handoff of page-locked host memory to a CUDA consumer, on a GPU machine
without TVM or pycuda (bench/gpu_check.sh runs it there).

    python bench/dlpack_gpu.py [--json]

The Engine hands a Jetson's mapped input buffers to the TVM runtime as CUDA DLPack tensors made
by `edgeflow.runtime.buffers.dlpack_capsule` from the buffers' device address. Here the same
producer wraps page-locked memory from torch (`pin_memory=True`) at its host address, which
unified addressing makes a device address too, and torch (the consumer) runs a kernel on it:
the numbers the CPU wrote must come out doubled, twice, without a copy, and the producer's
deleter must run once torch lets go. `--cpu` checks the same on host memory (no GPU needed).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when edgeflow is not installed


def check(device: str) -> dict:
    import torch

    from runtime.buffers import capsules_alive, dlpack_capsule

    pinned = torch.empty((1, 3, 64, 80), dtype=torch.float32, pin_memory=device == "cuda")
    host = pinned.numpy()  # the same memory, as the pipeline's ring holds it
    kind = (2, 0) if device == "cuda" else (1, 0)  # DLPack kDLCUDA / kDLCPU
    before = capsules_alive()
    view = torch.from_dlpack(dlpack_capsule(host, host.ctypes.data, kind))
    out = {"device": device, "view_device": str(view.device), "same_address": view.data_ptr() == host.ctypes.data}
    results = []
    for value in (0.5, -3.0):
        host[...] = value  # written by the CPU, read by the consumer's kernel where it lies
        doubled = (view * 2).cpu().numpy()
        results.append(bool(np.all(doubled == 2 * value)))
    out["kernel_reads_what_the_cpu_wrote"] = all(results)
    del view
    gc.collect()
    out["deleter_ran"] = capsules_alive() == before
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    out["ok"] = out["same_address"] and out["kernel_reads_what_the_cpu_wrote"] and out["deleter_ran"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="host memory and a CPU consumer")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = check("cpu" if args.cpu else "cuda")
    print(json.dumps(result, indent=2) if args.json else
          f"{result['device']}: {'ok' if result['ok'] else 'FAILED'} {result}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
