"""The natural style of the synthetic generator: photographs, 1/f textures, bending layers, a
small-motion regime, a camera that moves the whole scene, and what cameras do to images.

`edgeflow.synth.generate_pair(..., style="natural")` draws a pair from here. Compared with the
FlyingChairs-like default style:
- textures: half are crops of photographs shipped in scikit-image's data module (astronaut,
  coffee, motorcycles, grass, gravel, bricks, the moon, ...: public-domain or CC0 images, as its
  docstrings list), a quarter are colour fields with a natural 1/f^beta spectrum (beta 1.3-2.2,
  anisotropic), a quarter come from the default style's bank;
- motion: one pair in four is a small-motion pair (every motion times 0.03-0.3); in half of the
  pairs the foreground layers also follow the background (a panning camera, with parallax); a
  third of the foreground layers bend non-rigidly between the frames (a smooth displacement
  field, at most 7 % of the layer's size, slope below 0.4, flow still exact); 3-10 foreground layers;
- camera: defocus, motion blur along a random direction, fog (a smooth transmission field
  towards a bright airlight), vignetting, a global brightness change between the frames,
  signal-dependent shot noise, then the default style's photometric changes (gamma, contrast,
  colour, sensor noise) and JPEG compression of each frame.
None of these changes the flow, which stays exact as in the default style. Output depends only
on the generator passed in. Each ingredient can be left out (`INGREDIENTS`, the `without`
argument; `edgeflow train --natural-without`), which is how MODEL_CARD.md measures what each
does to the trained network. Speed: see `edgeflow synth --style natural` (it prints pairs/s).
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from edgeflow import synth
from edgeflow.errors import MissingDependency

# colour and grey photographs of scikit-image's data module (its own files, no download)
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png",
          "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
          "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png")
SPECTRAL = 24  # 1/f textures in their bank
F32 = np.float32
# what `without` can leave out: texture sources, motions, optics, atmosphere (fog, vignetting, a
# change of exposure between the frames), sensor (shot noise and JPEG)
INGREDIENTS = ("photos", "spectral", "bending", "small-motion", "pan", "blur", "atmosphere", "sensor")


def check_without(without) -> frozenset:
    """`without` as a frozenset of INGREDIENTS; InputError naming an unknown one."""
    from edgeflow.errors import InputError

    out = frozenset(without)
    unknown = sorted(out - set(INGREDIENTS))
    if unknown:
        raise InputError(f"natural-style ingredient {', '.join(map(repr, unknown))}: expected some of "
                         f"{', '.join(INGREDIENTS)}")
    return out


@lru_cache(maxsize=1)
def photo_bank() -> tuple[np.ndarray, ...]:
    """The photographs as uint8 BGR (grey ones replicated to 3 channels), at most 640 px a side."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency("the natural synthetic style needs scikit-image's sample photographs: "
                                     "pip install scikit-image")
    data = Path(spec.submodule_search_locations[0]) / "data"
    out = []
    for name in PHOTOS:
        path = data / name
        img = cv2.imdecode(np.frombuffer(_without_colour_profile(path.read_bytes()), np.uint8), cv2.IMREAD_COLOR) \
            if path.is_file() else None
        if img is None:
            raise MissingDependency(f"{data / name}: a scikit-image sample photograph is missing; "
                                         f"reinstall scikit-image")
        scale = 640 / max(img.shape[:2])
        if scale < 1:
            img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        out.append(img)
    return tuple(out)


def _without_colour_profile(data: bytes) -> bytes:
    """PNG bytes without their iCCP chunk (libpng warns about page.png's on every load; OpenCV
    ignores colour profiles anyway); other bytes unchanged."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, pos = [data[:8]], 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 12 + length
        if data[pos + 4:pos + 8] != b"iCCP":
            out.append(data[pos:end])
        pos = end
    return b"".join(out)


def _spectral(rng: np.random.Generator, n: int) -> np.ndarray:
    """n x n x 3 uint8: colour noise with a 1/f^beta amplitude spectrum, anisotropic."""
    fy, fx = np.meshgrid(np.fft.fftfreq(n), np.fft.rfftfreq(n), indexing="ij")
    a, stretch = rng.uniform(0, np.pi), float(np.exp(rng.uniform(-0.8, 0.8)))
    u, v = fx * math.cos(a) + fy * math.sin(a), -fx * math.sin(a) + fy * math.cos(a)
    radius = np.sqrt((u * stretch) ** 2 + (v / stretch) ** 2)
    radius[0, 0] = 1.0
    amp = radius ** -rng.uniform(1.3, 2.2)
    amp[0, 0] = 0.0
    mix = rng.normal(0, 1, (3, 3)) + 2.0 * np.eye(3)  # correlated colour channels
    channels = [np.fft.irfft2(amp * np.exp(2j * np.pi * rng.random(amp.shape)), (n, n)) for _ in range(3)]
    img = np.einsum("ij,jhw->hwi", mix, np.stack(channels))
    img = (img - img.mean((0, 1))) / (img.std() + 1e-9)
    img = rng.uniform(70, 180, 3) + img * rng.uniform(30, 65)
    return np.clip(img, 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def spectral_bank() -> tuple[np.ndarray, ...]:
    """The process-wide 1/f textures (uint8 512 x 512 x 3), built once from a fixed seed."""
    rng = np.random.default_rng(synth.BANK_SEED + 2)
    return tuple(_spectral(rng, synth.TEXTURE_SIDE) for _ in range(SPECTRAL))


def _source(rng: np.random.Generator, without: frozenset = frozenset()) -> np.ndarray:
    """A texture source: a photograph (1/2), a 1/f texture (1/4) or a default-style texture (1/4);
    a source left out (`without`) passes its share to the default-style textures."""
    u = rng.random()
    bank = photo_bank() if u < 0.5 and "photos" not in without else \
        spectral_bank() if 0.5 <= u < 0.75 and "spectral" not in without else synth.texture_bank()
    img = bank[rng.integers(len(bank))]
    if img.shape[2] == 3 and np.array_equal(img[:, :, 0], img[:, :, 1]) and rng.random() < 0.7:
        tint = rng.uniform(0.55, 1.0, 3)  # a grey photograph, tinted
        img = cv2.LUT(img, synth._lut(gain=tint, bias=rng.uniform(0, 40, 3)))
    return img


def _crop(rng: np.random.Generator, img: np.ndarray, h: int, w: int, zoom: tuple[float, float]) -> np.ndarray:
    """h x w crop of `img`, zoomed and turned by a small angle (by any angle one time in five)."""
    z = float(np.exp(rng.uniform(*np.log(zoom))))
    a = rng.normal(0, 0.15) if rng.random() < 0.8 else rng.uniform(0, 2 * np.pi)
    c, s = math.cos(a) * z, math.sin(a) * z
    oy, ox = rng.uniform(0.25, 0.75, 2) * img.shape[:2]
    m = np.array([[c, -s, w / 2 - c * ox + s * oy], [s, c, h / 2 - s * ox - c * oy]])
    out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if rng.random() < 0.3:
        out = out[:, :, rng.permutation(3)]
    return out


def _deformation(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """h x w x 2 float32 smooth displacement (px), at most 7 % of min(h, w), slope below 0.4."""
    n = min(h, w)
    cell = max(n / rng.uniform(1.2, 3.0), 4.0)
    amp = rng.uniform(0.02, 0.07) * n
    d = np.dstack([synth._value_noise(rng, h, w, cell) - 0.5 for _ in range(2)]) * (2 * amp)
    gy0, gx0 = np.gradient(d[:, :, 0])
    gy1, gx1 = np.gradient(d[:, :, 1])
    slope = float(np.sqrt(gx0 ** 2 + gy0 ** 2 + gx1 ** 2 + gy1 ** 2).max())
    if slope > 0.4:
        d *= 0.4 / slope
    return np.ascontiguousarray(d, dtype=F32)


def _scene(rng: np.random.Generator, h: int, w: int, without: frozenset = frozenset()) -> list[synth._Layer]:
    """A natural background and 3-10 foreground layers back to front, a third of them bending."""
    scale = math.sqrt(h * w)
    zoom = max(1.0, max(h, w) / 512)
    bg_img = np.ascontiguousarray(_crop(rng, _source(rng, without), 2 * h, 2 * w, (0.8 * zoom, 1.8 * zoom)))
    pose = np.array([w / 2, h / 2, rng.normal(0, 0.05), 0.0])
    layers = [synth._Layer(bg_img, np.array([w, h], float), np.eye(2), pose)]
    for _ in range(int(rng.integers(3, 11))):
        extent = float(np.exp(rng.uniform(np.log(0.1), np.log(0.6)))) * scale
        aspect = float(np.exp(rng.uniform(-0.7, 0.7)))
        sh, sw = max(int(extent / aspect ** 0.5), 10), max(int(extent * aspect ** 0.5), 10)
        sprite = np.dstack([_crop(rng, _source(rng, without), sh, sw, (0.5, 1.6)), synth._mask(rng, sh, sw)])
        pose = np.array([rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h,
                         rng.uniform(-np.pi, np.pi), rng.uniform(-0.1, 0.1)])
        deform = _deformation(rng, sh, sw) if rng.random() < 1 / 3 and "bending" not in without else None
        layers.append(synth._Layer(sprite, np.array([sw / 2, sh / 2]), synth._base(rng, 0.25, 0.25), pose,
                                   deform))
    return layers


def _motions(rng: np.random.Generator, count: int, w: int, without: frozenset = frozenset()) -> list[np.ndarray]:
    """Pose changes of the background and `count` foreground layers (see the module notes)."""
    moves = [synth._motion(rng, w, True)] + [synth._motion(rng, w, False) for _ in range(count)]
    if rng.random() < 0.5 and "pan" not in without:  # a panning camera: the foreground follows, with parallax
        for m in moves[1:]:
            m[:2] += moves[0][:2] * rng.uniform(0.6, 1.4)
    if rng.random() < 0.25 and "small-motion" not in without:  # the small-motion regime
        k = rng.uniform(0.03, 0.3)
        moves = [m * k for m in moves]
    return moves


def _disk(radius: float) -> np.ndarray:
    r = int(math.ceil(radius))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    k = np.clip(radius + 0.5 - np.sqrt(x * x + y * y), 0, 1).astype(F32)
    return k / k.sum()


def _line(length: float, angle: float) -> np.ndarray:
    r = int(math.ceil(length / 2)) + 1
    k = np.zeros((2 * r + 1, 2 * r + 1), F32)
    dx, dy = length / 2 * math.cos(angle), length / 2 * math.sin(angle)
    cv2.line(k, (int(round(r - dx)), int(round(r - dy))), (int(round(r + dx)), int(round(r + dy))), 1.0, 1,
             cv2.LINE_AA)
    return k / k.sum()


def _camera(rng: np.random.Generator, img1: np.ndarray, img2: np.ndarray, without: frozenset = frozenset()):
    """Optics, atmosphere and exposure of a real camera, applied to both frames (uint8 BGR)."""
    h, w = img1.shape[:2]
    imgs = [img1.astype(F32), img2.astype(F32)]
    blur, atmosphere, sensor = ("blur" not in without, "atmosphere" not in without, "sensor" not in without)
    if rng.random() < 0.15 and blur:  # defocus
        k = _disk(rng.uniform(1.0, 3.5))
        imgs = [cv2.filter2D(i, -1, k) for i in imgs]
    if rng.random() < 0.25 and blur:  # motion blur, each frame its own length
        a = rng.uniform(0, np.pi)
        imgs = [cv2.filter2D(i, -1, _line(rng.uniform(2, 12), a + rng.normal(0, 0.2))) for i in imgs]
    if rng.random() < 0.2 and atmosphere:  # fog: a smooth transmission field towards a bright airlight
        depth = cv2.resize(synth._value_noise(rng, h // 8 + 1, w // 8 + 1, 16), (w, h))
        t = np.exp(-rng.uniform(0.2, 1.0) * (0.3 + depth))[:, :, None]
        air = rng.uniform(170, 250) + rng.normal(0, 8, 3)
        imgs = [i * t + air * (1 - t) for i in imgs]
    if rng.random() < 0.3 and atmosphere:  # vignetting
        y, x = np.ogrid[0:h, 0:w]
        r2 = ((x - w / 2) / (w / 2)) ** 2 + ((y - h / 2) / (h / 2)) ** 2
        v = (1 - rng.uniform(0.1, 0.45) * r2 / 2).astype(F32)[:, :, None]
        imgs = [i * v for i in imgs]
    if rng.random() < 0.2 and atmosphere:  # the exposure or the light changes between the frames
        imgs[1] = imgs[1] * rng.uniform(0.75, 1.3)
    if rng.random() < 0.3 and sensor:  # shot noise: variance grows with the signal
        k = rng.uniform(0.2, 0.8)
        imgs = [i + k * np.sqrt(np.clip(i, 0, 255)) * synth._noise(rng, h, w) for i in imgs]
    img1, img2 = (np.clip(i + 0.5, 0, 255).astype(np.uint8) for i in imgs)
    img1, img2 = synth._photometric(rng, img1, img2)
    if rng.random() < 0.4 and sensor:  # JPEG, each frame on its own
        img1, img2 = (cv2.imdecode(cv2.imencode(".jpg", i, [cv2.IMWRITE_JPEG_QUALITY,
                                                            int(rng.integers(30, 91))])[1], cv2.IMREAD_COLOR)
                      for i in (img1, img2))
    return img1, img2


def natural_pair(rng: np.random.Generator, h: int, w: int, photometric: bool, without=()):
    """(img1, img2 uint8 HxWx3 BGR, flow float32 HxWx2, layer ids 1, layer ids 2) of one pair,
    leaving out the INGREDIENTS named in `without`."""
    without = check_without(without)
    layers = _scene(rng, h, w, without)
    moves = _motions(rng, len(layers) - 1, w, without)
    poses0 = [layer.pose for layer in layers]
    poses1 = [p + m for p, m in zip(poses0, moves)]
    img1, ids1, flow = synth._render(layers, poses0, h, w, poses1)
    img2, ids2, _ = synth._render(layers, poses1, h, w, deformed=True)
    if photometric:
        img1, img2 = _camera(rng, img1, img2, without)
    return img1, img2, flow, ids1, ids2
