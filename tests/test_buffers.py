"""Input buffers and their DLPack handoff to the TVM runtime: numpy rings everywhere, page-locked
rings where pycuda and a CUDA device exist; the engine-level handoff is tested in test_pipeline."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from edgeflow.runtime.buffers import (ALIGNMENT, BufferRing, aligned_empty, capsules_alive, dlpack_capsule,
                                      pinned_hint, tensor_view)


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
    assert all(a.ctypes.data % ALIGNMENT == 0 for a in ring.arrays)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8])
def test_aligned_empty(dtype):
    for shape in [(1, 3, 5, 7), (3,), (2, 64)]:
        a = aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.ctypes.data % ALIGNMENT == 0
        a[...] = 1  # writable, and as long as it says
        assert int(a.sum()) == a.size


def test_cpu_view_shares_the_arrays_memory():
    import tvm.runtime

    a = aligned_empty((1, 3, 4, 8), np.float32)
    a[...] = np.arange(a.size).reshape(a.shape)
    view = tensor_view(a, tvm.runtime.cpu(0))
    assert view.shape == a.shape and str(view.dtype) == "float32" and view.data_ptr() == a.ctypes.data
    a[0, 1, 2, 3] = -7
    assert view.numpy()[0, 1, 2, 3] == -7  # the same memory, not a snapshot
    assert tensor_view(a[:, :, :, ::2], tvm.runtime.cpu(0)) is None  # not contiguous
    unaligned = np.empty(a.size + 1, np.float32)[1:].reshape(a.shape)
    assert unaligned.ctypes.data % ALIGNMENT and tensor_view(unaligned, tvm.runtime.cpu(0)) is None
    assert tensor_view(a, tvm.runtime.cuda(0)) is None  # host memory not mapped for a device


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8])
def test_dlpack_capsule_hands_over_memory_and_its_owner(dtype):
    """The DLPack producer used for device pointers, checked on host memory: the tensor sees the
    array's memory; the owner lives as long as the tensor; the deleter runs when it goes."""
    import tvm.runtime

    before = capsules_alive()
    a = aligned_empty((2, 3, 16), dtype)
    a[...] = np.arange(a.size).reshape(a.shape) % 100
    expected = a.copy()
    t = tvm.runtime.from_dlpack(dlpack_capsule(a, a.ctypes.data, (1, 0)))
    assert t.shape == (2, 3, 16) and str(t.dtype) == np.dtype(dtype).name and t.data_ptr() == a.ctypes.data
    del a
    gc.collect()
    np.testing.assert_array_equal(t.numpy(), expected)  # the capsule's reference kept the memory
    assert capsules_alive() == before + 1
    del t
    gc.collect()
    assert capsules_alive() == before
    b = aligned_empty((4,), np.float32)
    unused = dlpack_capsule(b, b.ctypes.data, (1, 0))
    assert capsules_alive() == before + 1
    del unused  # never consumed: its destructor releases what it held
    assert capsules_alive() == before


def _double_kernel(shape):
    """A CUDA kernel y = 2 x over float32 `shape` (1, 3, H, W), H * W <= 1024."""
    import tvm
    from tvm.script import tirx as T

    _, c, h, w = shape

    @T.prim_func
    def double(x: T.Buffer(shape, "float32"), y: T.Buffer(shape, "float32")):
        for k in T.thread_binding(c, thread="blockIdx.x"):
            for i in T.thread_binding(h * w, thread="threadIdx.x"):
                y[0, k, i // w, i % w] = x[0, k, i // w, i % w] * T.float32(2)

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_" + tvm.cuda(0).compute_version.replace(".", "")},
                               host={"kind": "llvm"})
    return tvm.compile(tvm.IRModule({"main": double.with_attr("global_symbol", "main")}), target=target)["main"]


@pytest.mark.gpu
def test_mapped_ring_buffer_reaches_a_cuda_kernel_without_a_copy():
    """Page-locked, mapped buffers on a real CUDA device: the DLPack view is a CUDA tensor at the
    memory's address (unified addressing), and a kernel reads what the CPU writes there, call
    after call."""
    import tvm

    if pinned_hint("cuda") is not None:
        pytest.skip(pinned_hint("cuda"))
    import pycuda.driver as cuda

    dev = tvm.cuda(0)
    ring = BufferRing((1, 3, 8, 8), np.float32, 2, pinned=True)
    a = ring.next()
    assert ring.pinned and isinstance(a.base, cuda.HostAllocation)
    view = tensor_view(a, dev)
    assert view.device.dlpack_device_type() == 2 and view.data_ptr() == a.ctypes.data
    assert tensor_view(a.reshape(-1)[16:], dev).data_ptr() == a.ctypes.data + 64  # a view into the allocation
    double = _double_kernel(a.shape)
    out = tvm.runtime.empty(a.shape, "float32", dev)
    for value in (0.5, -3.0):
        a[...] = value  # written by the CPU into the mapped buffer, no copy to the device
        double(view, out)
        dev.sync()
        np.testing.assert_array_equal(out.numpy(), np.full(a.shape, 2 * value, np.float32))
    assert tensor_view(np.zeros(a.shape, np.float32), dev) is None  # plain host memory: the engine copies
