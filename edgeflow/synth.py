"""Synthetic optical-flow data: FlyingChairs-like pairs and continuous clips with exact flow.

A scene is a textured background plus 3-10 textured foreground layers (polygons, ellipses,
blobs, compound "chair-like" shapes, some with holes), ordered in depth. Every layer is an
affine sprite: frame t shows it warped by its pose at time t (`cv2.warpAffine`), and the flow of
a pixel of frame t is that of the topmost layer there, A_{t+1}(A_t^-1(p)) - p, computed
analytically (exact to cv2's 1/32-pixel warp precision). Layers keep their own motion where they
become occluded in the next frame. Layer membership uses hard masks (alpha >= 1/2); the images
use antialiased edges.

Textures come from a bank built once per process from a fixed seed (multi-scale value noise
through colour palettes, stripes, checkers, gradients, Voronoi cells, shape clutter and blends of
these); each layer takes a rotated, scaled, recoloured crop of one. Output depends only on the
`np.random.Generator` passed in: the same seed gives the same bytes. Speed (one core, OpenCV set
to one thread): about 115 pairs/s at 256x320 and 57 pairs/s at 384x512, plus ~1.5 s once per
process for the bank; in data-loader workers call cv2.setNumThreads(1), or OpenCV's threads
fight over the cores.

    generate_pair(rng, size=(384, 512)) -> (img1, img2, flow)      training pairs
    video_frames(rng, count, size=...) -> iterator of (img, flow)   a continuous scene
    write_chairs(out_dir, count, size=..., seed=...)                FlyingChairs layout on disk
    write_video(out_dir, frames, size=..., seed=..., fps=30)       clip.mp4 + frames/ + flow/
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from edgeflow.errors import EdgeflowError, InputError
from edgeflow.flow_io import write_atomic

TEXTURES = 48  # textures in the bank
TEXTURE_SIDE = 512  # side of a bank texture, pixels
BANK_SEED = 20240607  # fixed: the bank must not depend on the caller's generator
NOISE_SIDE = 1024  # side of the sensor-noise bank
F32 = np.float32


# ---------------------------------------------------------------------------------------------
# Texture bank


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth random field in [0, 1): uniform noise on a grid of `cell` pixels, cubic-resized."""
    gh, gw = int(math.ceil(h / cell)) + 3, int(math.ceil(w / cell)) + 3
    big = cv2.resize(rng.random((gh, gw), dtype=F32), (int(gw * cell), int(gh * cell)),
                     interpolation=cv2.INTER_CUBIC if cell >= 8 else cv2.INTER_LINEAR)
    y, x = int(rng.integers(0, big.shape[0] - h + 1)), int(rng.integers(0, big.shape[1] - w + 1))
    return big[y:y + h, x:x + w]


def _fractal(rng: np.random.Generator, n: int, cell: float | None = None, persistence: float | None = None,
             finest: float = 2.0) -> np.ndarray:
    """Multi-scale (1/f-like) noise n x n normalised to [0, 1]."""
    cell = cell or float(np.exp(rng.uniform(np.log(16), np.log(256))))
    persistence = persistence or float(rng.uniform(0.35, 0.75))
    out, amp = np.zeros((n, n), F32), 1.0
    while cell >= finest:
        out += amp * _value_noise(rng, n, n, cell)
        cell, amp = cell / 2, amp * persistence
    lo, hi = out.min(), out.max()
    return (out - lo) / max(hi - lo, 1e-6)


def _colours(rng: np.random.Generator, k: int) -> np.ndarray:
    """k random BGR colours (float 0..255), from vivid to muted, sharing a random tint."""
    base = rng.uniform(0, 255, 3)
    cols = rng.uniform(0, 255, (k, 3))
    sat = rng.uniform(0.2, 1.0)
    cols = (1 - sat) * cols.mean(1, keepdims=True) + sat * cols
    return np.clip(0.7 * cols + 0.3 * base * rng.uniform(0, 1), 0, 255)


def _palette(rng: np.random.Generator, field: np.ndarray, k: int | None = None) -> np.ndarray:
    """Map a [0, 1] field through a random piecewise-linear palette of k colours -> n x n x 3."""
    k = k or int(rng.integers(2, 6))
    stops = np.sort(np.r_[0.0, rng.uniform(0, 1, k - 2), 1.0])
    cols = _colours(rng, k)
    lut = np.stack([np.interp(np.linspace(0, 1, 256), stops, cols[:, c]) for c in range(3)], 1)
    if rng.random() < 0.3:  # a few hard colour steps
        lut = lut[(np.floor(np.linspace(0, 1, 256) * k * 2) / (k * 2) * 255).astype(int)]
    idx = np.clip(field * 255, 0, 255).astype(np.uint8)
    return lut.astype(F32)[idx]


def _coords(rng: np.random.Generator, n: int, period: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotated pixel coordinates scaled to radians of a wave of `period` pixels."""
    a = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:n, 0:n].astype(F32)
    u = (x * np.cos(a) + y * np.sin(a)) * (2 * np.pi / period)
    v = (-x * np.sin(a) + y * np.cos(a)) * (2 * np.pi / period)
    return u, v


def _tex_noise(rng, n):
    return _palette(rng, _fractal(rng, n))


def _tex_colour_noise(rng, n):
    lo, hi = rng.uniform(0, 120, 3), rng.uniform(135, 255, 3)
    return np.stack([lo[c] + (hi[c] - lo[c]) * _fractal(rng, n) for c in range(3)], -1).astype(F32)


def _tex_stripes(rng, n):
    period = float(np.exp(rng.uniform(np.log(5), np.log(64))))
    u, _ = _coords(rng, n, period)
    wave = np.sin(u + rng.uniform(0, 12) * _fractal(rng, n, cell=rng.uniform(64, 256)))
    wave = np.tanh(wave * rng.uniform(1, 6))
    field = 0.5 + 0.4 * wave + 0.2 * (_fractal(rng, n) - 0.5)
    return _palette(rng, field, int(rng.integers(2, 4)))


def _tex_checker(rng, n):
    period = float(np.exp(rng.uniform(np.log(8), np.log(96))))
    u, v = _coords(rng, n, period)
    field = np.tanh(np.sin(u) * np.sin(v) * rng.uniform(3, 12))
    field = 0.5 + 0.4 * field + 0.25 * (_fractal(rng, n) - 0.5)
    return _palette(rng, field, 2)


def _tex_gradient(rng, n):
    y, x = np.mgrid[0:n, 0:n].astype(F32) / n
    if rng.random() < 0.5:
        a = rng.uniform(0, 2 * np.pi)
        g = x * np.cos(a) + y * np.sin(a)
    else:
        cx, cy = rng.uniform(-0.2, 1.2, 2)
        g = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    g = (g - g.min()) / (g.max() - g.min())
    return _palette(rng, 0.7 * g + 0.3 * _fractal(rng, n))


def _tex_cells(rng, n):
    seeds = np.full((n, n), 255, np.uint8)
    count = int(np.exp(rng.uniform(np.log(20), np.log(1500))))
    seeds[rng.integers(0, n, count), rng.integers(0, n, count)] = 0
    dist, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
    cols = _colours(rng, 6)[rng.integers(0, 6, labels.max() + 1)]
    img = cols[labels].astype(F32)
    shade = np.clip(dist / (dist.max() + 1e-6), 0, 1)[..., None]
    if rng.random() < 0.5:  # dark cell borders / bright centres
        img *= (1 - rng.uniform(0.2, 0.7) * shade) if rng.random() < 0.5 else (0.6 + 0.4 * shade)
    return img


def _tex_shapes(rng, n):
    img = np.ascontiguousarray(_tex_noise(rng, n))
    cols = _colours(rng, 8)
    count = int(rng.integers(40, 250))
    for i in range(count):
        size = float(np.exp(rng.uniform(np.log(3), np.log(n / 4))))
        c = tuple(float(v) for v in cols[rng.integers(0, 8)])
        x, y = (int(v) for v in rng.integers(0, n, 2))
        kind = rng.integers(0, 4)
        if kind == 0:
            cv2.circle(img, (x, y), int(size / 2) + 1, c, -1, cv2.LINE_AA)
        elif kind == 1:
            box = cv2.boxPoints(((x, y), (size, size * rng.uniform(0.2, 1)), rng.uniform(0, 180)))
            cv2.fillPoly(img, [np.round(box).astype(np.int32)], c, cv2.LINE_AA)
        elif kind == 2:
            x2, y2 = (int(v) for v in np.array([x, y]) + rng.normal(0, size, 2))
            cv2.line(img, (x, y), (x2, y2), c, int(rng.integers(1, 6)), cv2.LINE_AA)
        else:
            pts = np.array([x, y]) + rng.normal(0, size / 2, (int(rng.integers(3, 7)), 2))
            cv2.fillPoly(img, [np.round(pts).astype(np.int32)], c, cv2.LINE_AA)
    return img


_KINDS = [_tex_noise, _tex_noise, _tex_colour_noise, _tex_stripes, _tex_checker, _tex_gradient,
          _tex_cells, _tex_cells, _tex_shapes, _tex_shapes]


def _texture(rng: np.random.Generator, n: int) -> np.ndarray:
    """One bank texture: a random kind, sometimes blended with another through a noise mask."""
    img = _KINDS[rng.integers(len(_KINDS))](rng, n)
    if rng.random() < 0.3:
        other = _KINDS[rng.integers(len(_KINDS))](rng, n)
        edge = rng.uniform(4, 40)
        mask = np.clip((_fractal(rng, n) - rng.uniform(0.35, 0.65)) * edge + 0.5, 0, 1)[..., None]
        img = img * mask + other * (1 - mask)
    # fine grain and a touch of optical blur: detail at every scale without pixel-level aliasing
    img = img + rng.uniform(0, 25) * (_fractal(rng, n, cell=8, persistence=0.8)[..., None] - 0.5)
    img = cv2.GaussianBlur(img.astype(F32), (0, 0), rng.uniform(0.5, 0.9))
    if rng.random() < 0.8:  # most textures get a decent contrast; a few stay faint
        mean, std = img.mean((0, 1)), img.std() + 1e-3
        img = mean + (img - mean) * np.clip(rng.uniform(30, 65) / std, 0.7, 4.0)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def texture_bank() -> tuple[np.ndarray, ...]:
    """The process-wide textures (uint8 TEXTURE_SIDE^2 x 3 BGR), built once from BANK_SEED."""
    rng = np.random.default_rng(BANK_SEED)
    return tuple(_texture(rng, TEXTURE_SIDE) for _ in range(TEXTURES))


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Unit Gaussian sensor noise, NOISE_SIDE^2 x 3 float32, fixed seed."""
    return np.random.default_rng(BANK_SEED + 1).standard_normal((NOISE_SIDE, NOISE_SIDE, 3), dtype=F32)


# ---------------------------------------------------------------------------------------------
# Layers: sprites with affine poses


@dataclass
class _Layer:
    """A sprite (uint8 HxWx3 background or HxWx4 BGRA foreground) and its pose.

    The pose [cx, cy, angle, log scale] places sprite point `origin` at image point (cx, cy),
    rotated by `angle` and scaled by exp(log scale) after the fixed linear map `base`. A layer
    with `deform` bends non-rigidly between the two frames of a pair: at the next poses, image
    point q shows sprite point s + deform(s), s being the affine preimage of q.
    """

    sprite: np.ndarray
    origin: np.ndarray
    base: np.ndarray
    pose: np.ndarray
    deform: np.ndarray | None = None  # sprite-space displacement (h x w x 2 px) at the next poses

    def matrix(self, pose: np.ndarray) -> np.ndarray:
        """2x3 affine sprite -> image at `pose`."""
        c, s = math.cos(pose[2]), math.sin(pose[2])
        lin = math.exp(pose[3]) * np.array([[c, -s], [s, c]]) @ self.base
        return np.hstack([lin, (pose[:2] - lin @ self.origin)[:, None]])


def _base(rng: np.random.Generator, aniso: float, shear: float) -> np.ndarray:
    """Fixed linear part of a layer: anisotropy and shear, sometimes mirrored."""
    a = float(np.exp(rng.uniform(-aniso, aniso)))
    base = np.array([[a, rng.uniform(-shear, shear)], [0.0, 1 / a]])
    return base * [[-1], [1]] if rng.random() < 0.5 else base


def _mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 h x w alpha (antialiased, 0 on a 2-pixel border): polygon, ellipse, blob or compound."""
    mask = np.zeros((h, w), np.uint8)
    cx, cy, rx, ry = w / 2, h / 2, w / 2 - 2, h / 2 - 2
    kind = rng.choice(4, p=[0.3, 0.2, 0.2, 0.3])
    shift = 4  # sub-pixel vertices for cv2 drawing

    def poly(pts, value):
        cv2.fillPoly(mask, [np.round(pts * (1 << shift)).astype(np.int32)], value, cv2.LINE_AA, shift)

    if kind == 0:  # star-shaped polygon
        n = int(rng.integers(3, 13))
        a = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(0.45, 1.0, n)
        poly(np.stack([cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)], 1), 255)
    elif kind == 1:  # ellipse
        cv2.ellipse(mask, ((cx, cy), (2 * rx, 2 * ry), 0.0), 255, -1, cv2.LINE_AA)
    elif kind == 2:  # blob: thresholded smooth noise inside a radial falloff
        y, x = np.ogrid[0:h, 0:w]
        r2 = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
        field = _value_noise(rng, h, w, max(min(h, w) / rng.uniform(2, 5), 2)) * 0.6 + 0.7 * (1 - r2)
        hard = np.where((field > 0.5) & (r2 < 1), 255, 0).astype(np.uint8)
        mask = cv2.GaussianBlur(hard, (3, 3), 0.7)
    else:  # compound "chair-like": a few rectangles, bars and ellipses
        for _ in range(int(rng.integers(2, 6))):
            pw, ph = rng.uniform(0.15, 1.0) * 2 * rx, rng.uniform(0.08, 0.6) * 2 * ry
            if rng.random() < 0.5:
                pw, ph = ph, pw
            px = rng.uniform(2 + pw / 2, w - 2 - pw / 2) if w - 4 > pw else cx
            py = rng.uniform(2 + ph / 2, h - 2 - ph / 2) if h - 4 > ph else cy
            box = ((px, py), (min(pw, w - 4), min(ph, h - 4)), float(rng.normal(0, 8)))
            if rng.random() < 0.7:
                poly(np.clip(cv2.boxPoints(box), 2, [w - 2, h - 2]), 255)
            else:
                cv2.ellipse(mask, box, 255, -1, cv2.LINE_AA)
    if rng.random() < 0.25:  # a hole showing what lies behind
        hx, hy = cx + rng.uniform(-0.3, 0.3) * rx, cy + rng.uniform(-0.3, 0.3) * ry
        cv2.ellipse(mask, ((hx, hy), (rng.uniform(0.15, 0.5) * rx, rng.uniform(0.15, 0.5) * ry),
                           rng.uniform(0, 180)), 0, -1, cv2.LINE_AA)
    if np.count_nonzero(mask > 127) < 16:
        cv2.ellipse(mask, ((cx, cy), (2 * rx, 2 * ry), 0.0), 255, -1, cv2.LINE_AA)
    mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = 0, 0, 0, 0
    return mask


def _texture_crop(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """h x w x 3 uint8: a rotated, magnified, recoloured crop of a bank texture."""
    bank = texture_bank()
    tex = bank[rng.integers(len(bank))]
    n = tex.shape[0]
    zoom = float(np.exp(rng.uniform(np.log(0.9), np.log(2.2))))
    a = rng.uniform(0, 2 * np.pi)
    c, s = math.cos(a) * zoom, math.sin(a) * zoom
    ox, oy = rng.uniform(0, n, 2)
    m = np.array([[c, -s, w / 2 - c * ox + s * oy], [s, c, h / 2 - s * ox - c * oy]])
    out = cv2.warpAffine(tex, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    u = rng.random()
    if u < 0.4:
        out = out[:, :, rng.permutation(3)]
    elif u < 0.6:
        out = cv2.LUT(out, _lut(gain=rng.uniform(0.6, 1.4, 3), bias=rng.uniform(-40, 40, 3)))
    elif u < 0.65:  # nearly flat: a low-texture object
        out = cv2.addWeighted(out, 0.15, np.full_like(out, rng.integers(0, 256, 3, dtype=np.uint8)), 0.85, 0)
    return out


def _foreground(rng: np.random.Generator, h: int, w: int, scale: float) -> _Layer:
    """A random foreground layer whose extent is 10-60 % of `scale` (sqrt of the image area)."""
    extent = float(np.exp(rng.uniform(np.log(0.1), np.log(0.6)))) * scale
    aspect = float(np.exp(rng.uniform(-0.7, 0.7)))
    s0 = float(rng.uniform(0.9, 1.25))  # pose scale: the sprite is drawn at extent / s0
    sh, sw = (max(int(extent / s0 / aspect ** 0.5), 10), max(int(extent / s0 * aspect ** 0.5), 10))
    sprite = np.dstack([_texture_crop(rng, sh, sw), _mask(rng, sh, sw)])
    pose = np.array([rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h,
                     rng.uniform(-np.pi, np.pi), np.log(s0)])
    return _Layer(sprite, np.array([sw / 2, sh / 2]), _base(rng, 0.25, 0.25), pose)


def _background(rng: np.random.Generator, h: int, w: int) -> _Layer:
    """The background: a whole bank texture magnified 0.9-2x (more for images above 640 px)."""
    bank = texture_bank()
    tex = bank[rng.integers(len(bank))]
    if rng.random() < 0.5:
        tex = tex[:, :, rng.permutation(3)]
    n = tex.shape[0]
    zoom = float(np.exp(rng.uniform(np.log(0.9), np.log(2.0)))) * max(1.0, max(h, w) / 640)
    pose = np.array([w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h,
                     rng.uniform(-np.pi, np.pi), np.log(zoom)])
    return _Layer(np.ascontiguousarray(tex), rng.uniform(0.3, 0.7, 2) * n, _base(rng, 0.1, 0.1), pose)


def _scene(rng: np.random.Generator, h: int, w: int) -> list[_Layer]:
    """Background first, then 3-10 foreground layers back to front."""
    scale = math.sqrt(h * w)
    return [_background(rng, h, w)] + [_foreground(rng, h, w, scale) for _ in range(int(rng.integers(3, 11)))]


def _magnitude(rng: np.random.Generator, probs, small: float, medium: float, large: float) -> float:
    """Displacement length from a mixture: uniform below `small`, log-uniform in the other bands."""
    band = rng.choice(3, p=probs)
    if band == 0:
        return float(rng.uniform(0, small))
    lo, hi = (small, medium) if band == 1 else (medium, large)
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _motion(rng: np.random.Generator, w: int, background: bool) -> np.ndarray:
    """Pose change between two frames [dx, dy, dangle, dlogscale]; larger for foreground layers."""
    if background:
        d = _magnitude(rng, [0.4, 0.45, 0.15], 2.0, w / 24, w / 8)
        rot, zoom = (1.0, 0.015) if rng.random() < 0.85 else (4.0, 0.06)
    else:
        d = _magnitude(rng, [0.25, 0.5, 0.25], 2.0, w / 20, w / 6.5)
        rot, zoom = (2.5, 0.03) if rng.random() < 0.8 else (10.0, 0.1)
    a = rng.uniform(0, 2 * np.pi)
    return np.array([d * math.cos(a), d * math.sin(a), np.radians(np.clip(rng.normal(0, rot), -25, 25)),
                     np.clip(rng.normal(0, zoom), -0.2, 0.2)])


# ---------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> np.ndarray:
    """Pixel coordinates h x w x 2 float32 (x, y)."""
    y, x = np.mgrid[0:h, 0:w].astype(F32)
    return np.ascontiguousarray(np.dstack([x, y]))


def _flow_matrix(m0: np.ndarray, m1: np.ndarray) -> np.ndarray:
    """2x3 D with D [x y 1]^T = M1 M0^-1 p - p, the flow of the layer at image point p."""
    full0 = np.vstack([m0, [0, 0, 1]])
    d = (m1 @ np.linalg.inv(full0))
    d[:, :2] -= np.eye(2)
    return d.astype(F32)


def _render(layers: list[_Layer], poses: list[np.ndarray], h: int, w: int,
            next_poses: list[np.ndarray] | None = None, *, deformed: bool = False):
    """Frame at `poses`: (uint8 h x w x 3, layer ids uint8 h x w, flow to `next_poses` or None).

    `deformed` renders the layers' `deform` (the second frame of a pair); the flow to
    `next_poses` assumes the next frame is rendered that way.
    """
    grid = _grid(h, w)
    bg = layers[0]
    m = bg.matrix(poses[0])
    img = cv2.warpAffine(bg.sprite, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    img = img.astype(F32)
    ids = np.zeros((h, w), np.uint8)
    flow = None if next_poses is None else cv2.transform(grid, _flow_matrix(m, bg.matrix(next_poses[0])))
    for k in range(1, len(layers)):
        layer = layers[k]
        m = layer.matrix(poses[k])
        sh, sw = layer.sprite.shape[:2]
        bend = deformed and layer.deform is not None
        pad = float(np.abs(layer.deform).max()) + 1 if bend else 0.0
        corners = m[:, :2] @ np.array([[-1 - pad, sw + pad, -1 - pad, sw + pad],
                                       [-1 - pad, -1 - pad, sh + pad, sh + pad]]) + m[:, 2:]
        x0, y0 = max(int(corners[0].min()), 0), max(int(corners[1].min()), 0)
        x1, y1 = min(int(corners[0].max()) + 2, w), min(int(corners[1].max()) + 2, h)
        if x1 <= x0 or y1 <= y0:
            continue
        if bend:
            warped = _warp_bent(layer.sprite, m, layer.deform, grid[y0:y1, x0:x1])
        else:
            m_roi = m - [[0, 0, x0], [0, 0, y0]]
            warped = cv2.warpAffine(layer.sprite, m_roi, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_CONSTANT)
        alpha = warped[:, :, 3]
        hard = alpha >= 128
        roi = img[y0:y1, x0:x1]
        roi += (warped[:, :, :3] - roi) * (alpha[:, :, None] * F32(1 / 255))
        ids[y0:y1, x0:x1][hard] = k
        if flow is not None:
            m_next = layer.matrix(next_poses[k])
            if layer.deform is None:
                f = cv2.transform(grid[y0:y1, x0:x1], _flow_matrix(m, m_next))
            else:
                f = _bent_flow(grid[y0:y1, x0:x1], m, m_next, layer.deform)
            np.copyto(flow[y0:y1, x0:x1], f, where=hard[:, :, None])
    return cv2.convertScaleAbs(img), ids, flow


def _warp_bent(sprite: np.ndarray, m: np.ndarray, deform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The sprite seen at image `points` (h x w x 2 px) through affine `m` and `deform`."""
    s = cv2.transform(points, cv2.invertAffineTransform(m))
    s += cv2.remap(deform, s, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return cv2.remap(sprite, s, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def _bent_flow(points: np.ndarray, m0: np.ndarray, m1: np.ndarray, deform: np.ndarray) -> np.ndarray:
    """Flow of image `points` of an unbent layer at affine m0 to the layer bent by `deform` at m1.

    Sprite point sigma = m0^-1 p reappears at m1 s with s + deform(s) = sigma, solved by the
    fixed-point iteration s = sigma - deform(s) (a contraction: deform's slope is below 0.4, so
    ten steps leave under 1e-4 of its size).
    """
    sigma = cv2.transform(points, cv2.invertAffineTransform(m0))
    s = sigma.copy()
    for _ in range(10):
        s = sigma - cv2.remap(deform, s, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return cv2.transform(s, m1) - points


def _lut(gain=1.0, bias=0.0, gamma=1.0) -> np.ndarray:
    """256 x 1 x 3 uint8 LUT: 255 (x/255)^gamma * gain + bias, per channel (scalars broadcast)."""
    gain, bias, gamma = (np.broadcast_to(np.asarray(v, float), (3,)) for v in (gain, bias, gamma))
    x = np.linspace(0, 1, 256)[:, None] ** gamma
    return np.ascontiguousarray(np.clip(255 * x * gain + bias + 0.5, 0, 255).astype(np.uint8)[:, None])


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """h x w x 3 float32 unit Gaussian noise: a random window of the noise bank (tiled if larger)."""
    bank = _noise_bank()
    if h > NOISE_SIDE or w > NOISE_SIDE:
        bank = np.tile(bank, (h // NOISE_SIDE + 1, w // NOISE_SIDE + 1, 1))
    y, x = int(rng.integers(0, bank.shape[0] - h + 1)), int(rng.integers(0, bank.shape[1] - w + 1))
    return bank[y:y + h, x:x + w]


def _sensor(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    """img + sigma * Gaussian noise, saturated to uint8."""
    if sigma <= 0:
        return img
    return cv2.addWeighted(img, 1.0, _noise(rng, *img.shape[:2]), sigma, 0.0, dtype=cv2.CV_8U)


def _photometric(rng: np.random.Generator, img1: np.ndarray, img2: np.ndarray):
    """Shared contrast/brightness/gamma/colour, a small extra change of img2, blur, sensor noise."""
    gamma = np.exp(rng.uniform(-0.35, 0.35))
    contrast = rng.uniform(0.6, 1.4)
    gain = contrast * rng.uniform(0.85, 1.15, 3)
    bias = 127.5 * (1 - contrast) + rng.uniform(-40, 40) + rng.normal(0, 6, 3)
    lut1 = _lut(gain, bias, gamma)
    lut2 = lut1
    if rng.random() < 0.8:
        delta = _lut(rng.uniform(0.94, 1.06) * rng.uniform(0.97, 1.03, 3), rng.normal(0, 5, 3),
                     np.exp(rng.normal(0, 0.05)))
        lut2 = np.take_along_axis(delta[:, 0], lut1[:, 0].astype(np.intp), 0)[:, None].copy()
    img1, img2 = cv2.LUT(img1, lut1), cv2.LUT(img2, lut2)
    u = rng.random()
    if u < 0.2:
        sigma = rng.uniform(0.3, 1.0)
        img1, img2 = cv2.GaussianBlur(img1, (0, 0), sigma), cv2.GaussianBlur(img2, (0, 0), sigma)
    elif u < 0.3:
        img2 = cv2.GaussianBlur(img2, (0, 0), rng.uniform(0.3, 0.8))
    sigma = rng.uniform(0, 6) if rng.random() < 0.6 else 0.0
    return _sensor(rng, img1, sigma), _sensor(rng, img2, sigma)


# ---------------------------------------------------------------------------------------------
# Public API


STYLES = ("chairs", "natural")


def generate_pair(rng: np.random.Generator, size: tuple[int, int] = (384, 512), *, photometric: bool = True,
                  aux: bool = False, style: str = "chairs", without=()):
    """One pair: (img1, img2 uint8 HxWx3 BGR, flow float32 HxWx2 from img1 to img2).

    `style` "chairs" is FlyingChairs-like (this module's notes); "natural" adds photographs,
    1/f textures, bending layers, small motions, a panning camera and camera effects
    (`edgeflow.synth_natural`; `without` names the ingredients it leaves out). Flow is exact in
    pixels (u right, v down) for every pixel of img1, occluded or not. `photometric=False` skips
    the brightness/colour/blur/noise changes (img2 is then img1's layers moved, nothing else).
    `aux=True` appends a dict: `layers1`, `layers2` (uint8 HxW index of the topmost layer,
    0 = background) and `occluded` (bool HxW: the pixel's layer is not what img2 shows at the
    rounded target, or the target leaves the image).
    """
    h, w = int(size[0]), int(size[1])
    if without and style != "natural":
        raise InputError(f"synthetic style {style!r} has no ingredients to leave out ({', '.join(without)}); "
                         f"only the natural style has")
    if style == "natural":
        from edgeflow.synth_natural import natural_pair

        img1, img2, flow, ids1, ids2 = natural_pair(rng, h, w, photometric, without)
    elif style == "chairs":
        layers = _scene(rng, h, w)
        poses0 = [layer.pose for layer in layers]
        poses1 = [p + _motion(rng, w, k == 0) for k, p in enumerate(poses0)]
        img1, ids1, flow = _render(layers, poses0, h, w, poses1)
        img2, ids2, _ = _render(layers, poses1, h, w)
        if photometric:
            img1, img2 = _photometric(rng, img1, img2)
    else:
        raise InputError(f"synthetic style {style!r}: expected one of {', '.join(STYLES)}")
    if not aux:
        return img1, img2, flow
    return img1, img2, flow, {"layers1": ids1, "layers2": ids2, "occluded": _occluded(flow, ids1, ids2)}


def _occluded(flow: np.ndarray, ids1: np.ndarray, ids2: np.ndarray) -> np.ndarray:
    h, w = ids1.shape
    target = _grid(h, w) + flow
    tx, ty = np.rint(target[:, :, 0]).astype(np.int64), np.rint(target[:, :, 1]).astype(np.int64)
    inside = (tx >= 0) & (tx < w) & (ty >= 0) & (ty < h)
    seen = ids2[np.clip(ty, 0, h - 1), np.clip(tx, 0, w - 1)]
    return ~inside | (seen != ids1)


def _velocity(rng: np.random.Generator, w: int, background: bool) -> np.ndarray:
    """Per-frame pose change of a layer in a clip: mostly slow, a few fast movers."""
    if background:
        d = _magnitude(rng, [0.4, 0.45, 0.15], 1.0, w / 60, w / 25)
        rot, zoom = 0.3, 0.004
    else:
        d = _magnitude(rng, [0.3, 0.5, 0.2], 1.0, w / 40, w / 12)
        rot, zoom = 1.0, 0.008
    a = rng.uniform(0, 2 * np.pi)
    return np.array([d * math.cos(a), d * math.sin(a), np.radians(rng.normal(0, rot)), rng.normal(0, zoom)])


def video_frames(rng: np.random.Generator, count: int, size: tuple[int, int] = (384, 512), *,
                 photometric: bool = True):
    """Yield `count` frames of one continuous scene: (img uint8 HxWx3 BGR, flow to the next frame).

    Each layer keeps a velocity (translation, rotation and zoom rates); foreground layers bounce
    off a margin around the image and off zoom limits, the background pans freely. The flow of
    the last frame is None. Photometric changes are fixed for the clip, plus per-frame sensor
    noise, so the flow stays exact.
    """
    h, w = int(size[0]), int(size[1])
    layers = _scene(rng, h, w)
    vel = [_velocity(rng, w, k == 0) for k in range(len(layers))]
    lo = [np.array([-np.inf, -np.inf, -np.inf, layer.pose[3] - 0.35]) for layer in layers]
    hi = [np.array([np.inf, np.inf, np.inf, layer.pose[3] + 0.35]) for layer in layers]
    for k in range(1, len(layers)):
        lo[k][:2], hi[k][:2] = [-0.15 * w, -0.15 * h], [1.15 * w, 1.15 * h]
    if photometric:
        gamma, contrast = np.exp(rng.uniform(-0.3, 0.3)), rng.uniform(0.7, 1.3)
        lut = _lut(contrast * rng.uniform(0.9, 1.1, 3), 127.5 * (1 - contrast) + rng.uniform(-30, 30), gamma)
        sigma = rng.uniform(0, 4)
    poses = [layer.pose for layer in layers]
    for n in range(count):
        nxt = None
        if n + 1 < count:
            for k, p in enumerate(poses):
                out = (p + vel[k] < lo[k]) | (p + vel[k] > hi[k])
                vel[k] = np.where(out, -vel[k], vel[k])
            nxt = [p + v for p, v in zip(poses, vel)]
        img, _, flow = _render(layers, poses, h, w, nxt)
        if photometric:
            img = _sensor(rng, cv2.LUT(img, lut), sigma)
        yield img, flow
        poses = nxt


# ---------------------------------------------------------------------------------------------
# Writers


def _check(count: int, size: tuple[int, int], what: str) -> tuple[int, int]:
    if int(count) < 1:
        raise InputError(f"{what} {count}: expected a positive count")
    h, w = (int(v) for v in size)
    if h < 16 or w < 16:
        raise InputError(f"size {h}x{w}: expected at least 16x16")
    return h, w


def _write_png(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    write_atomic(path, buf.tobytes())


def _bar(total: int, progress: bool, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not progress, file=sys.stderr, unit=unit, dynamic_ncols=True)


def write_chairs(out_dir: str | os.PathLike, count: int, *, size: tuple[int, int] = (384, 512), seed: int = 0,
                 style: str = "chairs", progress: bool = True) -> Path:
    """Write `count` pairs in the FlyingChairs layout: NNNNN_img1.png, NNNNN_img2.png, NNNNN_flow.flo.

    Numbering is 1-based with 5 digits. Pair i is drawn from `np.random.default_rng([seed, i])`
    in `style` (see `generate_pair`), so it does not depend on `count`. Every file is written atomically (temporary file, then
    rename) and the flow last, so a killed run leaves only complete pairs plus at most two images.
    """
    from edgeflow.flow_io import write_flow

    h, w = _check(count, size, "count")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _bar(count, progress, "pair") as bar:
        for i in range(1, count + 1):
            img1, img2, flow = generate_pair(np.random.default_rng([seed, i]), (h, w), style=style)
            _write_png(out / f"{i:05d}_img1.png", img1)
            _write_png(out / f"{i:05d}_img2.png", img2)
            write_flow(out / f"{i:05d}_flow.flo", flow)
            bar.update(1)
    return out


def write_video(out_dir: str | os.PathLike, frames: int, *, size: tuple[int, int] = (384, 512), seed: int = 0,
                fps: float = 30, progress: bool = True) -> Path:
    """Write a continuous clip: clip.mp4 (mp4v), frames/frame_NNNN.png, flow/frame_NNNN.flo.

    Frames are numbered from 0; flow/frame_NNNN.flo is the forward flow from frame N to N+1
    (frames - 1 files). The PNGs are the exact frames (the mp4 is lossy). Files are written
    atomically; clip.mp4 appears when the clip is complete.
    """
    from edgeflow.flow_io import write_flow

    h, w = _check(frames, size, "frames")
    if not fps > 0:
        raise InputError(f"fps {fps}: expected a positive frame rate")
    if h % 2 or w % 2:
        raise InputError(f"size {h}x{w}: an mp4 clip needs an even height and width")
    out = Path(out_dir)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    (out / "flow").mkdir(exist_ok=True)
    tmp = out / f".clip.{os.getpid()}.mp4"  # the container is chosen by the suffix
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
    if not writer.isOpened():
        raise EdgeflowError(f"{tmp}: OpenCV cannot open an mp4v video writer (no FFmpeg backend?)")
    try:
        with _bar(frames, progress, "frame") as bar:
            for n, (img, flow) in enumerate(video_frames(np.random.default_rng(seed), frames, (h, w))):
                writer.write(img)
                _write_png(out / "frames" / f"frame_{n:04d}.png", img)
                if flow is not None:
                    write_flow(out / "flow" / f"frame_{n:04d}.flo", flow)
                bar.update(1)
        writer.release()
        os.replace(tmp, out / "clip.mp4")
    finally:
        writer.release()
        tmp.unlink(missing_ok=True)
    return out
