"""Input buffers of the streaming pipeline and their handoff to the TVM runtime as DLPack tensors.

A Jetson's CPU and GPU share DRAM: a page-locked, device-mapped buffer (pycuda, PORTABLE |
DEVICEMAP) is read by the network's kernels where it lies, so a prepared frame reaches the GPU
without any copy. On a CPU the same holds for plain numpy arrays. Either way `tensor_view(array,
device)` wraps the array's memory as a TVM tensor through DLPack (`tvm.runtime.from_dlpack`),
and the Engine hands that tensor to the network; only an array that cannot be wrapped (another
dtype, not C-contiguous, not aligned to `ALIGNMENT` bytes, host memory not mapped for a CUDA
device) is copied into the Engine's own input tensor.

The pipeline's preprocess stage writes each prepared frame [1,3,H,W] into the next buffer of a
`BufferRing`, which holds enough buffers that none is reused while a frame in it is in flight.
pycuda is optional (the `jetson` extra): without it, or without a CUDA device, the ring holds
numpy arrays and `pinned_hint()` says in one line why.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np

log = logging.getLogger(__name__)

ALIGNMENT = 64  # bytes: what the TVM runtime asks of the data of a tensor it takes by DLPack
_KDLCPU, _KDLCUDA = 1, 2  # DLPack device types
_DTYPE_CODES = {"i": 0, "u": 1, "f": 2}  # DLPack type codes of numpy kinds (int, uint, float)


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


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `ALIGNMENT`-byte boundary
    (numpy's own allocations are 16-byte aligned, too little for `tensor_view`)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class BufferRing:
    """`count` arrays of `shape` and `dtype`, handed out in turn by `next()`. Page-locked and
    device-mapped (pycuda `pagelocked_empty`, PORTABLE | DEVICEMAP, in CUDA device
    `device_index`'s primary context) when `pinned`, else numpy (`aligned_empty`); both kinds
    are handed to the network without a copy."""

    def __init__(self, shape: tuple[int, ...], dtype, count: int, *, pinned: bool = False, device_index: int = 0):
        self.pinned = pinned
        self._context = None  # the primary context retained while the page-locked buffers live
        if pinned:
            import pycuda.driver as cuda

            cuda.init()
            if cuda.Context.get_current() is None:  # cuMemHostAlloc needs a current context
                self._context = cuda.Device(device_index).retain_primary_context()
                self._context.push()
            flags = cuda.host_alloc_flags.PORTABLE | cuda.host_alloc_flags.DEVICEMAP
            try:
                self.arrays = [cuda.pagelocked_empty(shape, dtype, mem_flags=flags) for _ in range(count)]
            finally:
                if self._context is not None:
                    cuda.Context.pop()
        else:
            self.arrays = [aligned_empty(shape, dtype) for _ in range(count)]
        self._next = 0

    @classmethod
    def for_engine(cls, engine, count: int) -> "BufferRing":
        """A ring for `engine`'s inputs, page-locked when its device is CUDA and pycuda works
        (else plain, and the reason is logged once for a CUDA engine)."""
        from edgeflow.runtime.format import device_index

        device = str(engine.device)
        hint = pinned_hint(device)
        if hint is not None and device.startswith("cuda"):
            log.info(hint)
        return cls((1, 3, engine.height, engine.width), engine.input_dtype, count, pinned=hint is None,
                   device_index=device_index(device))

    def next(self) -> np.ndarray:
        array = self.arrays[self._next]
        self._next = (self._next + 1) % len(self.arrays)
        return array


def tensor_view(array: np.ndarray, device):
    """A TVM tensor on `device` (a `tvm.runtime.Device`) over `array`'s own memory, or None
    where there is none without a copy: `array` not C-contiguous or not `ALIGNMENT`-aligned; for
    a CUDA device, `array` not in pycuda page-locked memory or the device without unified
    addressing.

    CPU: numpy's own DLPack export. CUDA: a DLPack tensor of the memory's device address (on a
    Jetson the same DRAM the CPU wrote; elsewhere, host memory the GPU reads over the bus)."""
    import tvm.runtime

    if not array.flags.c_contiguous or array.ctypes.data % ALIGNMENT or array.dtype.kind not in _DTYPE_CODES:
        return None
    if device.dlpack_device_type() == _KDLCPU:
        return tvm.runtime.from_dlpack(array)
    if device.dlpack_device_type() != _KDLCUDA:
        return None
    pointer = mapped_device_pointer(array, device.index)
    if pointer is None:
        return None
    return tvm.runtime.from_dlpack(dlpack_capsule(array, pointer, (_KDLCUDA, device.index)))


def mapped_device_pointer(array: np.ndarray, device_index: int = 0) -> int | None:
    """The address at which CUDA device `device_index` reads `array`, when `array` lies in pycuda
    page-locked memory (`pagelocked_empty`, or a view of it) and the device has unified
    addressing: there page-locked host memory is read by kernels at its host address (CUDA
    driver API, "Unified Addressing"), so no context is needed to ask. Else None."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        return None
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, cuda.HostAllocation) or not _unified_addressing(device_index):
        return None
    return int(array.ctypes.data)


_UNIFIED: dict[int, bool] = {}


def _unified_addressing(device_index: int) -> bool:
    if device_index not in _UNIFIED:
        import pycuda.driver as cuda

        cuda.init()
        _UNIFIED[device_index] = bool(cuda.Device(device_index).get_attribute(
            cuda.device_attribute.UNIFIED_ADDRESSING))
    return _UNIFIED[device_index]


# -- a DLPack producer for memory numpy cannot describe (a device pointer) --------------------------

class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter)]

# Address of each DLManagedTensor handed out -> what it keeps alive. No lock: the deleter runs with
# the GIL held, and a lock taken under the GIL by Python code could deadlock it; dict operations
# are atomic under the GIL.
_alive: dict[int, tuple] = {}
_CAPSULE_NAME = b"dltensor"
_capsule_new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", ctypes.pythonapi))
_capsule_is_valid = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_IsValid", ctypes.pythonapi))
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


@_Deleter
def _delete(managed) -> None:
    """The consumer is done with the tensor: drop the struct and the reference to the memory."""
    _alive.pop(ctypes.addressof(managed.contents), None)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _capsule_destructor(capsule: int) -> None:
    """A capsule that nobody consumed (still named "dltensor") is freed: run the deleter."""
    if _capsule_is_valid(capsule, _CAPSULE_NAME):
        _alive.pop(_capsule_pointer(capsule, _CAPSULE_NAME), None)


def dlpack_capsule(owner: np.ndarray, data: int, device: tuple[int, int]):
    """A "dltensor" PyCapsule (DLPack 0.x, what `tvm.runtime.from_dlpack` takes) describing
    `owner`'s shape and dtype at address `data` on `device` (DLPack device type, index). Until
    the consumer calls the deleter (or, when none consumes it, until the capsule is freed) a
    reference to `owner` keeps its memory alive."""
    dtype = owner.dtype
    shape = (ctypes.c_int64 * owner.ndim)(*owner.shape)
    managed = _DLManagedTensor()
    managed.dl_tensor = _DLTensor(data, _DLDevice(*device), owner.ndim,
                                  _DLDataType(_DTYPE_CODES[dtype.kind], dtype.itemsize * 8, 1), shape, None, 0)
    managed.deleter = _delete
    _alive[ctypes.addressof(managed)] = (managed, shape, owner)
    return _capsule_new(ctypes.addressof(managed), _CAPSULE_NAME, ctypes.cast(_capsule_destructor, ctypes.c_void_p))


def capsules_alive() -> int:
    """DLManagedTensors made by `dlpack_capsule` that are still in use (not deleted)."""
    return len(_alive)
