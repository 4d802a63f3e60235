"""Input buffers: numpy rings everywhere, page-locked rings where pycuda and a CUDA device exist."""

from __future__ import annotations

import numpy as np
import pytest

from edgeflow.runtime.buffers import BufferRing, pinned_hint


def test_cpu_devices_use_numpy_buffers():
    hint = pinned_hint("cpu")
    assert hint is not None and "\n" not in hint and "numpy" in hint


def test_cuda_without_pycuda_is_a_one_line_hint():
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        hint = pinned_hint("cuda")
        assert hint == ("pycuda is not installed: plain numpy buffers "
                        "(pip install 'edgeflow[jetson]' for page-locked ones)")
    else:
        pytest.skip("pycuda is installed here")


def test_ring_hands_out_its_buffers_in_turn():
    ring = BufferRing((1, 3, 4, 6), np.float16, 3)
    got = [ring.next() for _ in range(7)]
    assert not ring.pinned and all(a.shape == (1, 3, 4, 6) and a.dtype == np.float16 for a in got)
    assert [id(a) for a in got] == [id(ring.arrays[i % 3]) for i in range(7)]
    assert len({id(a) for a in got[:3]}) == 3


@pytest.mark.gpu
def test_pinned_ring_feeds_a_cuda_engine():
    """Page-locked, mapped buffers on a real CUDA device (skipped where pycuda or a GPU is missing)."""
    if pinned_hint("cuda") is not None:
        pytest.skip(pinned_hint("cuda"))
    import pycuda.driver as cuda

    ring = BufferRing((1, 3, 8, 8), np.float32, 2, pinned=True)
    a = ring.next()
    assert ring.pinned and isinstance(a.base, cuda.HostAllocation) and a.base.get_device_pointer()
    a[...] = 0.5
    assert float(a.mean()) == 0.5
