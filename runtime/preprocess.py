"""The one image -> network input and network output -> flow conversion, used by the Engine,
evaluation, the compiler's accuracy check and training alike. numpy and OpenCV only.

Network input: float [1,3,H,W] RGB in [0,1]. Network output: flow [2,H,W] in pixels at the
network's size; `flow_to_size` turns it into HxWx2 at the images' size with the vectors scaled
by the resize ratios.
"""

from __future__ import annotations

import cv2
import numpy as np

from edgeflow.errors import InputError


def check_image(img, name: str = "image") -> np.ndarray:
    """`img` as uint8 HxW (gray) or HxWx3 (BGR); HxWx1 becomes HxW. InputError otherwise."""
    if not isinstance(img, np.ndarray):
        raise InputError(f"{name}: expected a numpy uint8 image, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise InputError(f"{name}: expected a uint8 image, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) or 0 in img.shape:
        raise InputError(f"{name}: expected HxWx3 BGR or HxW gray, got shape {img.shape}")
    return img


def resize(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """`a` at height x width: INTER_AREA when shrinking both sides, INTER_LINEAR otherwise."""
    h, w = a.shape[:2]
    if (h, w) == (height, width):
        return a
    interp = cv2.INTER_AREA if height <= h and width <= w else cv2.INTER_LINEAR
    return cv2.resize(a, (width, height), interpolation=interp)


def to_input(img: np.ndarray, size: tuple[int, int] | None = None, dtype=np.float32,
             out: np.ndarray | None = None) -> np.ndarray:
    """uint8 BGR HxWx3 or gray HxW -> array [1,3,H',W'] RGB in [0,1] of `dtype`, resized to
    `size` (H', W') when given: `out` (e.g. a page-locked buffer of that shape) or a new array."""
    img = check_image(img)
    if size is not None:
        img = resize(img, int(size[0]), int(size[1]))
    rgb = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB if img.ndim == 2 else cv2.COLOR_BGR2RGB)
    x = np.empty((1, 3, *rgb.shape[:2]), dtype) if out is None else out
    np.multiply(rgb.transpose(2, 0, 1), np.float32(1 / 255), out=x[0], casting="unsafe")
    return x


def flow_to_size(flow: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Network flow [2,Hn,Wn] (pixels) -> float32 HxWx2 at `size` (H, W), u scaled by W/Wn and v
    by H/Hn."""
    h, w = int(size[0]), int(size[1])
    hn, wn = flow.shape[1:]
    if (h, w) == (hn, wn):
        return np.ascontiguousarray(flow.transpose(1, 2, 0), np.float32)
    small = np.empty((hn, wn, 2), np.float32)  # scaled at the network's size (resizing is linear): one pass fewer
    np.multiply(flow[0], np.float32(w / wn), out=small[..., 0], casting="unsafe")
    np.multiply(flow[1], np.float32(h / hn), out=small[..., 1], casting="unsafe")
    return resize(small, h, w)
