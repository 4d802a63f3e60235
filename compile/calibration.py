"""Calibration frames: the user's own unlabelled video frames, checked before any work starts.

    frames = read_frames("frames/", size=(256, 320))   # uint8 HxWx3 BGR, consecutive in name order

A calibration directory holds at least two frames of one camera as image files; consecutive
frames (in file-name order) form the pairs that pruning distils on. Everything is read and
checked up front, so a bad directory fails with one line before anything is computed or written.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeflow.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
MIN_FRAMES = 2


def read_frames(directory: str | os.PathLike, size: tuple[int, int] | None = None) -> list:
    """The image files directly in `directory`, sorted by name, as uint8 HxWx3 BGR arrays,
    resized to `size` (H, W) when given.

    InputError (one line, naming the directory and what was expected) if it is not a directory,
    holds fewer than MIN_FRAMES image files, or any of them is unreadable or all one colour.
    """
    import cv2

    from edgeflow.runtime.preprocess import resize

    root = Path(directory)
    where = f"calibration={str(root)!r}"
    expected = (f"expected a directory of at least {MIN_FRAMES} video frames, consecutive in file-name order "
                f"({', '.join('*' + s for s in IMAGE_SUFFIXES[:3])}, ...)")
    if not root.is_dir():
        raise InputError(f"{where}: not a directory; {expected}")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < MIN_FRAMES:
        raise InputError(f"{where}: {len(files)} frame{'s' * (len(files) != 1)} found; {expected}")
    frames = []
    for path in files:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise InputError(f"{where}: {path.name} is not a readable image; {expected}")
        if (img == img[:1, :1]).all():
            raise InputError(f"{where}: {path.name} is all one colour (BGR {img[0, 0].tolist()}), it shows no "
                             f"scene to match; {expected}")
        frames.append(resize(img, *size) if size else img)
    return frames
