"""Peak memory of the runtime: the RSS of a process that loads a package and runs it.

    python bench/rss.py PACKAGE [--calls 3] [--threads N]

Prints one JSON object: {"imports_mb": peak RSS after importing the runtime (numpy, OpenCV, the
TVM runtime; no torch), "peak_mb": peak RSS after loading the package and `--calls` calls of
the Engine on a generated pair at its input size}, in MiB (ru_maxrss). Run it in a process of
its own: the peak of a process that imported torch or the compiler says nothing about the runtime.
torch is blocked as on a device without it: tvm_ffi imports torch whenever it is installed
(`tvm_ffi/__init__.py`), which would add torch's few hundred MiB to the runtime's figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys


def peak_mib() -> float:
    """This process's peak resident set size so far, MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    sys.modules["torch"] = None  # `import torch` raises ImportError, as on a device without torch
    import numpy as np

    import cv2  # noqa: F401  (what the Engine imports when it loads a package)
    import tvm.runtime  # noqa: F401

    from edgeflow.runtime import load
    from edgeflow.runtime.engine import Engine  # noqa: F401
    from edgeflow.synth import generate_pair

    imports = peak_mib()
    engine = load(args.package, threads=args.threads)
    img1, img2, _ = generate_pair(np.random.default_rng(0), (engine.height, engine.width))
    for _ in range(args.calls):
        engine(img1, img2)
    print(json.dumps({"package": args.package, "imports_mb": imports, "peak_mb": peak_mib(), "calls": args.calls,
                      "threads": engine.threads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
