"""Classical OpenCV flow methods, the accuracy and speed peers of the networks.

Each baseline is a callable `(img1, img2) -> flow`: images uint8 HxWx3 BGR or HxW gray of the
same size, flow float32 HxWx2 forward flow in pixels at the input resolution.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgeflow.errors import choices_error

FlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

BASELINES = ("dis-ultrafast", "dis-fast", "dis-medium", "dis-fine", "farneback")

# OpenCV's tutorial values: pyramid scale 0.5, 3 levels, 15 px window, 3 iterations,
# polynomial neighbourhood 5 with sigma 1.2.
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
# DIS-medium refined down to full resolution: 8 px patches every 3 px, 25 gradient-descent and 10
# variational iterations (about 5x DIS-medium's time; 93 ms against 20 ms at 384x512 on one core).
DIS_FINE = dict(PatchSize=8, PatchStride=3, GradientDescentIterations=25, VariationalRefinementIterations=10,
                FinestScale=0)


def baseline(name: str) -> FlowFn:
    """The flow function of baseline `name` (one of BASELINES)."""
    import cv2

    if name not in BASELINES:
        raise choices_error("baseline", name, BASELINES)
    if name == "farneback":
        def farneback(img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
            return cv2.calcOpticalFlowFarneback(_gray(img1), _gray(img2), None, **FARNEBACK)

        return farneback

    preset = {"dis-ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
              "dis-fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
              "dis-medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
              "dis-fine": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[name]
    dis = cv2.DISOpticalFlow_create(preset)
    if name == "dis-fine":
        for key, value in DIS_FINE.items():
            getattr(dis, f"set{key}")(value)

    def dis_flow(img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
        return dis.calc(_gray(img1), _gray(img2), None)

    dis_flow.__name__ = name
    return dis_flow


def _gray(img: np.ndarray) -> np.ndarray:
    import cv2

    return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
