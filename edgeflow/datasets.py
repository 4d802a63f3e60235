"""Optical-flow evaluation sets on disk: FlyingChairs, MPI-Sintel, KITTI 2015, Middlebury, realflow.

`open_dataset(path)` recognises the layout of a directory and returns its named sets
(`chairs`, `middlebury`, `middlebury-color`, `sintel-clean`, `sintel-final`, `sintel-final-hard`,
`kitti`). A `Dataset` is a sequence of `Sample`s, read from disk on access:
img1, img2 uint8 HxWx3 BGR (gray files are loaded as 3-channel), flow float32 HxWx2 forward
flow in pixels, valid bool HxW, and a name such as `alley_1/frame_0002`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edgeflow.errors import InputError
from edgeflow.flow_io import read_flow_valid

LAYOUTS = {
    "realflow": "middlebury/SEQ/frame10.png, sintel/{clean,final}/SCENE/frame_NNNN.png, kitti2015/ID/image_2",
    "FlyingChairs": "NNNNN_img1.ppm|png, NNNNN_img2.ppm|png, NNNNN_flow.flo",
    "MPI-Sintel": "training/{clean,final}/SCENE/frame_NNNN.png, training/flow/SCENE/frame_NNNN.flo",
    "KITTI 2015": "training/image_2/NNNNNN_10.png, training/flow_occ/NNNNNN_10.png",
    "Middlebury": "other-data/SEQ/frame10.png, other-gt-flow/SEQ/flow10.flo",
}


class Sample(NamedTuple):
    """One evaluation pair: BGR uint8 images, float32 HxWx2 flow (pixels), bool HxW valid, name."""

    img1: np.ndarray
    img2: np.ndarray
    flow: np.ndarray
    valid: np.ndarray
    name: str


@dataclass(frozen=True)
class Pair:
    """Files of one pair; `invalid` is an optional 8-bit mask, 255 (any value >= 128) = invalid."""

    img1: Path
    img2: Path
    flow: Path
    name: str
    invalid: Path | None = None


class Dataset(Sequence):
    """A named, ordered list of pairs whose files are read when a sample is accessed."""

    def __init__(self, name: str, pairs: list[Pair]):
        self.name = name
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Sample:
        return load_pair(self.pairs[i])

    def __iter__(self) -> Iterator[Sample]:
        return (load_pair(p) for p in self.pairs)

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, {len(self)} pairs)"


def open_dataset(path: str | os.PathLike) -> dict[str, Dataset]:
    """{set name: Dataset} for the first known layout that `path` holds pairs of."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"data directory {str(root)!r} does not exist")
    for detect in (_realflow, _chairs, _sintel, _kitti, _middlebury):
        sets = {name: Dataset(name, pairs) for name, pairs in detect(root).items() if pairs}
        if sets:
            return sets
    known = "; ".join(f"{k} ({v})" for k, v in LAYOUTS.items())
    raise InputError(f"no optical-flow pairs found in {str(root)!r}; known layouts: {known}")


def load_pair(pair: Pair) -> Sample:
    """Read the files of `pair`; InputError naming the files if they are missing or differ in size."""
    img1, img2 = _imread(pair.img1), _imread(pair.img2)
    flow, valid = read_flow_valid(pair.flow)
    if img1.shape != img2.shape:
        raise InputError(f"image sizes differ: {pair.img1} is {_size(img1)}, {pair.img2} is {_size(img2)}")
    if flow.shape[:2] != img1.shape[:2]:
        raise InputError(f"flow size differs from image size: {pair.flow} is {_size(flow)}, "
                         f"{pair.img1} is {_size(img1)}")
    if pair.invalid is not None:
        mask = _imread(pair.invalid, gray=True)
        if mask.shape != valid.shape:
            raise InputError(f"mask size differs from flow size: {pair.invalid} is {_size(mask)}, "
                             f"{pair.flow} is {_size(flow)}")
        valid &= mask < 128
    return Sample(img1, img2, flow, valid, pair.name)


def _imread(path: Path, gray: bool = False) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(f"{path}: missing or not a readable image")
    return img


def _size(a: np.ndarray) -> str:
    return f"{a.shape[1]}x{a.shape[0]}"


def _need(*paths: Path) -> None:
    for p in paths:
        if not p.is_file():
            raise InputError(f"{p}: file of the pair is missing")


def _dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def _next_frame(path: Path) -> Path:
    """frame_0002.png -> frame_0003.png (Sintel numbering, width kept)."""
    stem = re.fullmatch(r"(.*?)(\d+)", path.stem)
    if stem is None:
        raise InputError(f"{path}: expected a numbered frame name like frame_0001")
    prefix, num = stem.groups()
    return path.with_name(f"{prefix}{int(num) + 1:0{len(num)}d}.png")


def _middlebury_seq(seq: Path, flow: Path) -> Pair:
    pair = Pair(seq / "frame10.png", seq / "frame11.png", flow, seq.name)
    _need(pair.img1, pair.img2)
    return pair


def _sintel_scene(frames: Path, flows: Path, invalid: Path | None) -> list[Pair]:
    pairs = []
    for flow in sorted(flows.glob("frame_*.flo")):
        img1 = frames / flow.with_suffix(".png").name
        mask = invalid / img1.name if invalid is not None else None
        pair = Pair(img1, _next_frame(img1), flow, f"{frames.name}/{flow.stem}", mask)
        _need(pair.img1, pair.img2, *([mask] if mask else []))
        pairs.append(pair)
    return pairs


def _kitti_pairs(images: Path, flows: Path) -> list[Pair]:
    pairs = []
    for flow in sorted(flows.glob("*_10.png")):
        frame = flow.name[:-len("_10.png")]
        pair = Pair(images / flow.name, images / f"{frame}_11.png", flow, frame)
        _need(pair.img1, pair.img2)
        pairs.append(pair)
    return pairs


def _realflow(root: Path) -> dict[str, list[Pair]]:
    """../shared/realflow: middlebury/, middlebury-color/, sintel/{clean,final}/, kitti2015/."""
    sets: dict[str, list[Pair]] = {}
    for name in ("middlebury", "middlebury-color"):
        sets[name] = [_middlebury_seq(s, s / "flow10.flo") for s in _dirs(root / name)
                      if (s / "flow10.flo").is_file()]
    for kind in ("clean", "final"):
        for scene in _dirs(root / "sintel" / kind):
            # The README asks for sintel/final/ambush_4 (fog, blur, ~90 px motion) apart, as "hard".
            name = f"sintel-{kind}-hard" if (kind, scene.name) == ("final", "ambush_4") else f"sintel-{kind}"
            sets.setdefault(name, []).extend(_sintel_scene(scene, scene, scene / "invalid"))
    sets["kitti"] = [p for d in _dirs(root / "kitti2015")
                     for p in _kitti_pairs(d / "image_2", d / "flow_occ")]
    return sets


def _chairs(root: Path) -> dict[str, list[Pair]]:
    """FlyingChairs_release/data (or the data directory itself): flat NNNNN_* files."""
    data = root / "data" if (root / "data").is_dir() else root
    pairs = []
    for flow in sorted(data.glob("*_flow.flo")):
        frame = flow.name[:-len("_flow.flo")]
        ext = ".ppm" if (data / f"{frame}_img1.ppm").is_file() else ".png"
        pair = Pair(data / f"{frame}_img1{ext}", data / f"{frame}_img2{ext}", flow, frame)
        _need(pair.img1, pair.img2)
        pairs.append(pair)
    return {"chairs": pairs}


def _training(root: Path, *subdirs: str) -> Path | None:
    """`root/training` or `root` itself, whichever holds all `subdirs`."""
    for base in (root / "training", root):
        if all((base / s).is_dir() for s in subdirs):
            return base
    return None


def _sintel(root: Path) -> dict[str, list[Pair]]:
    """MPI-Sintel-complete: training/{clean,final}/SCENE, training/flow/SCENE, training/invalid/SCENE."""
    base = _training(root, "flow")
    if base is None:
        return {}
    sets = {}
    for kind in ("clean", "final"):
        sets[f"sintel-{kind}"] = [
            p for scene in _dirs(base / kind)
            for p in _sintel_scene(scene, base / "flow" / scene.name,
                                   base / "invalid" / scene.name if (base / "invalid").is_dir() else None)]
    return sets


def _kitti(root: Path) -> dict[str, list[Pair]]:
    """KITTI 2015 flow: training/image_2/NNNNNN_1{0,1}.png, training/flow_occ/NNNNNN_10.png."""
    base = _training(root, "image_2", "flow_occ")
    return {"kitti": _kitti_pairs(base / "image_2", base / "flow_occ")} if base else {}


def _middlebury(root: Path) -> dict[str, list[Pair]]:
    """Middlebury: other-data/SEQ/frame1{0,1}.png (or other-data-gray), other-gt-flow/SEQ/flow10.flo."""
    data = next((root / d for d in ("other-data", "other-data-gray") if (root / d).is_dir()), None)
    if data is None:
        return {}
    gt = root / "other-gt-flow"
    return {"middlebury": [_middlebury_seq(data / s.name, s / "flow10.flo") for s in _dirs(gt)
                           if (s / "flow10.flo").is_file()]}
