"""Input buffers of the streaming pipeline: page-locked, device-mapped host memory (pycuda) for
CUDA engines, plain numpy arrays otherwise.

A Jetson's CPU and GPU share DRAM: a page-locked, mapped buffer is copied to the network's input
by DMA without a staging copy, and the copy can overlap the next capture. The pipeline's
preprocess stage writes each prepared frame [1,3,H,W] into the next buffer of a `BufferRing`,
which holds enough buffers that none is reused while a frame in it is still in flight.

pycuda is optional (the `jetson` extra): without it, or without a CUDA device, the ring holds
numpy arrays and `pinned_hint()` says in one line why.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def pinned_hint(device: str) -> str | None:
    """None when page-locked buffers can be used for `device` ("cpu", "cuda", "cuda:N"); else
    one line saying why not."""
    if not device.startswith("cuda"):
        return f"device {device}: plain numpy buffers (page-locked memory is for CUDA devices)"
    try:
        import pycuda.driver as cuda
    except ImportError:
        return "pycuda is not installed: plain numpy buffers (pip install 'edgeflow[jetson]' for page-locked ones)"
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA device: plain numpy buffers"
    except cuda.Error as e:
        return f"CUDA unavailable ({' '.join(str(e).split())}): plain numpy buffers"
    return None


class BufferRing:
    """`count` arrays of `shape` and `dtype`, handed out in turn by `next()`. Page-locked and
    device-mapped (pycuda `pagelocked_empty`, PORTABLE | DEVICEMAP) when `pinned`, else numpy."""

    def __init__(self, shape: tuple[int, ...], dtype, count: int, *, pinned: bool = False):
        self.pinned = pinned
        if pinned:
            import pycuda.driver as cuda

            flags = cuda.host_alloc_flags.PORTABLE | cuda.host_alloc_flags.DEVICEMAP
            self.arrays = [cuda.pagelocked_empty(shape, dtype, mem_flags=flags) for _ in range(count)]
        else:
            self.arrays = [np.empty(shape, dtype) for _ in range(count)]
        self._next = 0

    @classmethod
    def for_engine(cls, engine, count: int) -> "BufferRing":
        """A ring for `engine`'s inputs, page-locked when its device is CUDA and pycuda works
        (else plain, and the reason is logged once for a CUDA engine)."""
        device = str(engine.device)
        hint = pinned_hint(device)
        if hint is not None and device.startswith("cuda"):
            log.info(hint)
        return cls((1, 3, engine.height, engine.width), engine.input_dtype, count, pinned=hint is None)

    def next(self) -> np.ndarray:
        array = self.arrays[self._next]
        self._next = (self._next + 1) % len(self.arrays)
        return array
