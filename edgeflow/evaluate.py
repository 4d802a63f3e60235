"""Accuracy of a flow method on evaluation data: `evaluate(method, data_dir) -> dict`.

A method is an OpenCV baseline name (`edgeflow.baselines.BASELINES`), a registry model name
(torch on the CPU), a compiled package `.tar` (loaded with `edgeflow.runtime.load`), or any
callable `(img1_bgr, img2_bgr) -> flow float32 HxWx2` in pixels.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from edgeflow.baselines import BASELINES, FlowFn, baseline
from edgeflow.errors import EdgeflowError, InputError, choices_error


def evaluate(method, data_dir: str | os.PathLike, *, weights="default", size: tuple[int, int] | None = None,
             trusted_keys=None, progress: bool = True) -> dict:
    """EPE of `method` on every set `edgeflow.datasets.open_dataset(data_dir)` finds.

    weights, size: for a registry model, as in `edgeflow.models.create` and `model_flow`;
    trusted_keys: for a package, as in `edgeflow.runtime.load`. Returns
    `{"method": str, "epe": mean EPE (px) over all pairs of all sets,
      "sets": {name: {"epe": mean EPE (px) over its pairs, "pairs": n, "ms_per_pair": mean time of
      the method call}}}`, with `"fl_all"` (0..1, mean over pairs) added to the `kitti` set.
    A progress bar goes to stderr when `progress` and stderr is a terminal.
    """
    from tqdm import tqdm

    from edgeflow.datasets import open_dataset
    from edgeflow.metrics import epe, fl_all

    sets = open_dataset(data_dir)
    name, fn = resolve_method(method, weights=weights, size=size, trusted_keys=trusted_keys)
    all_epe: list[float] = []
    report: dict[str, dict] = {}
    bar = tqdm(total=sum(map(len, sets.values())), unit="pair", file=sys.stderr,
               disable=not (progress and sys.stderr.isatty()))
    with bar:
        for set_name, dataset in sets.items():
            epes, fls, seconds = [], [], 0.0
            for sample in dataset:
                bar.set_description(f"{set_name} {sample.name}")
                start = time.perf_counter()
                flow = fn(sample.img1, sample.img2)
                seconds += time.perf_counter() - start
                flow = np.asarray(flow)
                if flow.shape != sample.flow.shape:
                    raise EdgeflowError(f"{name} returned flow of shape {flow.shape} for {set_name} "
                                        f"{sample.name}; expected {sample.flow.shape}")
                epes.append(epe(flow, sample.flow, sample.valid))
                if set_name == "kitti":
                    fls.append(fl_all(flow, sample.flow, sample.valid))
                bar.update()
            report[set_name] = {"epe": float(np.mean(epes)), "pairs": len(epes),
                                "ms_per_pair": 1000 * seconds / len(epes)}
            if fls:
                report[set_name]["fl_all"] = float(np.mean(fls))
            all_epe += epes
    return {"method": name, "epe": float(np.mean(all_epe)), "sets": report}


def resolve_method(method, *, weights="default", size: tuple[int, int] | None = None,
                   trusted_keys=None) -> tuple[str, FlowFn]:
    """(display name, flow function) for a baseline name, model name, package path or callable."""
    from edgeflow.models import create, names

    if callable(method):
        return getattr(method, "__name__", type(method).__name__), method
    method = str(method)
    if method in BASELINES:
        return method, baseline(method)
    if method in names():
        return method, model_flow(create(method, weights=weights), size)
    if method.endswith(".tar"):
        if not Path(method).is_file():
            raise InputError(f"package {method!r} does not exist")
        from edgeflow.runtime import load

        return method, load(method, trusted_keys=trusted_keys)
    raise choices_error("method", method, [*BASELINES, *names(), "PACKAGE.tar"])


def model_flow(model, size: tuple[int, int] | None = None) -> FlowFn:
    """Wrap a torch flow network as `(img1, img2) -> flow` on images of any size.

    Images (uint8 BGR HxWx3 or gray HxW) are resized to `size` (H, W; multiples of 64), by default
    to the next multiples of 64 of their own size, converted to RGB in [0, 1], run under
    torch.no_grad, and the flow is resized back with its u and v scaled by the width and height
    ratios: the same pre- and post-processing as the runtime Engine (`runtime.preprocess`).
    """
    import torch

    from edgeflow.runtime.preprocess import flow_to_size, to_input

    def flow_fn(img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
        h, w = img1.shape[:2]
        net = size or (-(-h // 64) * 64, -(-w // 64) * 64)
        with torch.no_grad():
            out = model(torch.from_numpy(to_input(img1, net)), torch.from_numpy(to_input(img2, net)))
        return flow_to_size(out[0].numpy(), (h, w))

    return flow_fn
