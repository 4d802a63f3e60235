"""EPE and KITTI Fl-all on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from edgeflow import epe, fl_all
from edgeflow.errors import InputError
from edgeflow.metrics import epe_map


def test_epe_hand_computed():
    gt = np.zeros((2, 3, 2), np.float32)
    pred = gt.copy()
    pred[0, 0] = (3, 4)  # error 5
    pred[1, 2] = (0, -1)  # error 1
    assert epe(pred, gt) == pytest.approx(6 / 6)
    assert epe_map(pred, gt)[0, 0] == 5
    valid = np.zeros((2, 3), bool)
    valid[0, 0] = valid[1, 2] = True
    assert epe(pred, gt, valid) == pytest.approx(3.0)


def test_unknown_ground_truth_is_masked():
    gt = np.zeros((2, 2, 2), np.float32)
    gt[0, 0] = (1e9, 1e9)
    gt[0, 1] = (np.nan, 0)
    pred = np.full((2, 2, 2), 1.0, np.float32)
    assert epe(pred, gt) == pytest.approx(np.sqrt(2))
    assert fl_all(pred, gt) == 0.0


def test_fl_all_thresholds():
    # True magnitudes 100 and 10: error 4 is > 3 px but < 5% of 100, > 5% of 10.
    gt = np.array([[[100, 0], [10, 0], [0, 0], [0, 0]]], np.float32)
    pred = gt + np.array([[[4, 0], [4, 0], [2, 0], [6, 0]]], np.float32)
    # pixel 0: 4 < 5 -> fine; pixel 1: outlier; pixel 2: 2 px -> fine; pixel 3: outlier
    assert fl_all(pred, gt) == pytest.approx(0.5)
    assert fl_all(pred, gt, np.array([[True, True, False, False]])) == pytest.approx(0.5)
    assert fl_all(pred, gt, np.array([[True, False, True, False]])) == 0.0


def test_errors():
    a = np.zeros((2, 3, 2), np.float32)
    with pytest.raises(InputError, match="shapes"):
        epe(a, np.zeros((3, 2, 2), np.float32))
    with pytest.raises(InputError, match="valid mask"):
        epe(a, a, np.ones((3, 2), bool))
    with pytest.raises(InputError, match="no valid"):
        fl_all(a, a, np.zeros((2, 3), bool))
