"""Flow accuracy: end-point error (EPE) and KITTI Fl-all.

pred and gt are HxWx2 flows in pixels. A ground-truth vector counts only where it is known
(finite and below 1e9 in magnitude) and, if a bool HxW `valid` mask is given, where that is True.
"""

from __future__ import annotations

import numpy as np

from edgeflow.errors import InputError
from edgeflow.flow_io import known


def epe_map(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """float32 HxW Euclidean distance (pixels) between predicted and true vectors."""
    pred, gt = _check(pred, gt)
    return np.hypot(pred[..., 0] - gt[..., 0], pred[..., 1] - gt[..., 1]).astype(np.float32)


def epe(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Mean end-point error in pixels over the valid pixels."""
    mask = _mask(pred, gt, valid)
    return float(epe_map(pred, gt)[mask].astype(np.float64).mean())


def epe_chw(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean end-point error (pixels) between two flows in network layout, [2,H,W] or [1,2,H,W]."""
    pred, ref = (np.moveaxis(np.asarray(a, np.float32).reshape(2, *np.shape(a)[-2:]), 0, -1) for a in (pred, ref))
    return epe(pred, ref)


def fl_all(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> float:
    """KITTI Fl-all: share (0..1) of valid pixels with error > 3 px and > 5% of the true magnitude."""
    mask = _mask(pred, gt, valid)
    err = epe_map(pred, gt)[mask]
    mag = np.hypot(gt[..., 0], gt[..., 1])[mask]
    return float(np.mean((err > 3.0) & (err > 0.05 * mag)))


def _check(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or gt.ndim != 3 or gt.shape[2] != 2:
        raise InputError(f"flow shapes differ or are not HxWx2: prediction {pred.shape}, ground truth {gt.shape}")
    return pred, gt


def _mask(pred, gt, valid) -> np.ndarray:
    pred, gt = _check(pred, gt)
    mask = known(gt)
    if valid is not None:
        valid = np.asarray(valid, bool)
        if valid.shape != mask.shape:
            raise InputError(f"valid mask of shape {valid.shape} does not match flow of shape {gt.shape[:2]}")
        mask &= valid
    if not mask.any():
        raise InputError("no valid ground-truth pixels to measure against")
    return mask
