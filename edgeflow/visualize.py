"""Flow to colour with the Middlebury colour wheel (Baker et al., IJCV 2011, `flowToColor`).

Hue gives the direction, saturation the magnitude: zero flow is white, +u (right) red, -u cyan,
+v (down) yellow-orange, -v blue-violet. Unknown vectors (NaN or >= 1e9) are black.
"""

from __future__ import annotations

import numpy as np

from edgeflow.errors import InputError
from edgeflow.flow_io import known

# Segment lengths of the wheel: red-yellow, yellow-green, green-cyan, cyan-blue, blue-magenta,
# magenta-red (chosen by Baker et al. for perceptual uniformity).
RY, YG, GC, CB, BM, MR = 15, 6, 4, 11, 13, 6
# Per segment: length, RGB channel held at 255, channel ramping, ramp direction.
_SEGMENTS = ((RY, 0, 1, 1), (YG, 1, 0, -1), (GC, 1, 2, 1), (CB, 2, 1, -1), (BM, 2, 0, 1), (MR, 0, 2, -1))


def make_colorwheel() -> np.ndarray:
    """The 55x3 RGB wheel in [0, 255] (float64), as in the Middlebury `makeColorwheel`."""
    wheel = np.zeros((sum(s[0] for s in _SEGMENTS), 3))
    col = 0
    for n, held, ramping, direction in _SEGMENTS:
        ramp = np.floor(255 * np.arange(n) / n)
        wheel[col:col + n, held] = 255
        wheel[col:col + n, ramping] = ramp if direction > 0 else 255 - ramp
        col += n
    return wheel


def flow_to_color(flow: np.ndarray, max_flow: float | None = None) -> np.ndarray:
    """uint8 HxWx3 image in BGR order (ready for cv2.imwrite) of flow HxWx2 (pixels).

    Vectors are divided by `max_flow` (pixels), or by the largest known magnitude when it is
    None; magnitudes at or beyond it take the full colour darkened to 3/4, as in Middlebury.
    """
    flow = np.asarray(flow, np.float32)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise InputError(f"flow_to_color: expected an HxWx2 flow array, got shape {flow.shape}")
    if max_flow is not None and not max_flow > 0:
        raise InputError(f"flow_to_color: max_flow must be a positive number of pixels, got {max_flow!r}")
    ok = known(flow)
    u = np.where(ok, flow[..., 0], 0).astype(np.float64)
    v = np.where(ok, flow[..., 1], 0).astype(np.float64)
    rad = np.hypot(u, v)
    scale = max_flow if max_flow is not None else (rad.max() if rad.size else 0.0)
    u, v, rad = u / (scale + 1e-5), v / (scale + 1e-5), rad / (scale + 1e-5)

    wheel = make_colorwheel()
    n = len(wheel)
    fk = (np.arctan2(-v, -u) / np.pi + 1) / 2 * (n - 1)
    k0 = np.floor(fk).astype(int)
    k1 = (k0 + 1) % n
    f = (fk - k0)[..., None]
    col = ((1 - f) * wheel[k0] + f * wheel[k1]) / 255
    inside = (rad <= 1)[..., None]
    col = np.where(inside, 1 - rad[..., None] * (1 - col), col * 0.75)
    rgb = np.floor(255 * col).astype(np.uint8)
    rgb[~ok] = 0
    return np.ascontiguousarray(rgb[..., ::-1])
