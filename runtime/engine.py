"""The Engine: a compiled package loaded into the TVM Relax VM, called on image pairs.

`engine(img1, img2)` takes uint8 HxWx3 BGR (or HxW gray) images of any size, both the same size,
and returns float32 HxWx2 forward flow in pixels at that size. Inside it runs three steps, timed
apart by the streaming pipeline: `prepare` (`preprocess.to_input` at the compiled size),
`run_tensor` (the network, on the package's device) and `finish` (`preprocess.flow_to_size`).
Prepared inputs reach the network as DLPack tensors over their own memory where they can
(`buffers.tensor_view`: aligned numpy arrays on a CPU, page-locked mapped buffers on CUDA), else
through a copy into the Engine's input tensors (`input_copies` counts those).
Imports numpy, OpenCV and the TVM runtime only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeflow.errors import InputError, PackageError, one_line
from edgeflow.runtime.buffers import aligned_empty, tensor_view
from edgeflow.runtime.preprocess import check_image, flow_to_size, to_input


class Engine:
    """A loaded package. Build it with `edgeflow.runtime.load(path, device=None, threads=None)`,
    which verifies the package first; `signer` is the key id of its signature (None when
    unsigned). The network runs on a thread of the Engine's own whose TVM pool has `threads`
    CPU threads (every physical core by default); calls from several threads take turns."""

    def __init__(self, manifest: dict, directory: str | Path, device: str | None = None, signer: str | None = None,
                 threads: int | None = None):
        import tvm.runtime
        from tvm.runtime.vm import VirtualMachine

        from edgeflow.runtime.format import device_index
        from edgeflow.runtime.threads import PoolThread

        self.manifest, self.signer = manifest, signer
        self.directory = Path(directory)
        kind = manifest["target"]["kind"]
        self.device = str(device or kind)
        inp = manifest["input"]
        self.height, self.width = int(inp["height"]), int(inp["width"])
        self.input_dtype = np.dtype(inp.get("dtype", "float32"))
        self._on_gpu = kind == "cuda"
        self._dev = tvm.runtime.cuda(device_index(device)) if self._on_gpu else tvm.runtime.cpu(0)

        try:
            lib = tvm.runtime.load_module(str(self.directory / "lib" / "model.so"))
            if self._on_gpu:
                lib.import_module(_cuda_module(self.directory / "lib"))
            self._vm = VirtualMachine(lib, self._dev)
        except Exception as e:  # noqa: BLE001 - TVM raises its own error types for a bad library
            raise PackageError(f"{manifest['model'].get('name')} package: the TVM runtime cannot load its library "
                               f"({_first_line(e)})") from None
        self._params = [tvm.runtime.tensor(a, self._dev) for a in _load_params(self.directory / "params.npz",
                                                                                manifest["params"]["order"])]
        shape = (1, 3, self.height, self.width)
        self._main = self._vm["main"]  # main(x1, x2, *params): passing the parameters costs microseconds
        # For inputs that cannot be handed over as they are: a staging array (dtype, layout), then a copy.
        self._inputs = [tvm.runtime.empty(shape, str(self.input_dtype), self._dev) for _ in range(2)]
        self._staging = [np.empty(shape, self.input_dtype) for _ in range(2)]
        self.input_copies = 0  # inputs copied into the Engine's tensors instead of handed over
        self._pool = PoolThread(threads)  # last: a library that fails to load leaves no thread behind
        self.threads = self._pool.threads

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Engine({m['model'].get('name')} {self.height}x{self.width} {m.get('precision')} "
                f"for {m['target'].get('name')} on {self.device}, {self.threads} threads)")

    def __call__(self, img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
        """Forward flow float32 HxWx2 (pixels) from uint8 BGR/gray `img1` to `img2` (same size)."""
        img1, img2 = check_image(img1, "img1"), check_image(img2, "img2")
        if img1.shape[:2] != img2.shape[:2]:
            raise InputError(f"images differ in size: {_hw(img1)} and {_hw(img2)}")
        flow = self.run_tensor(self.prepare(img1), self.prepare(img2))
        return self.finish(flow, img1.shape[:2])

    def prepare(self, img: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 BGR/gray HxW[x3] -> array [1,3,H_net,W_net] RGB in [0,1] of the input dtype (`out`,
        e.g. a page-locked buffer, or a new array aligned for handing over without a copy)."""
        if out is None:
            out = aligned_empty((1, 3, self.height, self.width), self.input_dtype)
        return to_input(img, (self.height, self.width), self.input_dtype, out)

    def run_tensor(self, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
        """The network on prepared [1,3,H_net,W_net] inputs: flow float32 [2,H_net,W_net] (pixels)."""
        xs = [np.asarray(x) for x in (x1, x2)]
        for staging, x, name in zip(self._staging, xs, ("x1", "x2")):
            if x.shape != staging.shape:
                raise InputError(f"{name}: expected an array of shape {staging.shape}, got {x.shape}")
        return self._pool.call(self._run, xs)

    def _run(self, xs: list[np.ndarray]) -> np.ndarray:
        args = []
        for buf, staging, x in zip(self._inputs, self._staging, xs):
            view = tensor_view(x, self._dev) if x.dtype == self.input_dtype else None
            if view is None:
                if x.dtype != staging.dtype or not x.flags.c_contiguous:
                    np.copyto(staging, x, casting="unsafe")
                    x = staging
                buf.copyfrom(x)
                self.input_copies += 1
                view = buf
            args.append(view)
        out = self._main(*args, *self._params)
        if not hasattr(out, "numpy"):  # a tuple of outputs: the flow is the first
            out = out[0]
        flow = out.numpy() if self._on_gpu else np.from_dlpack(out)  # CPU: the VM's own output, no copy
        return flow[0].astype(np.float32, copy=False)

    def close(self) -> None:
        """End the Engine's network thread (an unclosed Engine's daemon thread never blocks exit)."""
        self._pool.close()

    def finish(self, flow: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Flow [2,H_net,W_net] -> float32 HxWx2 at `size` (H, W), vectors scaled by the resize ratios."""
        return flow_to_size(flow, size)

    def stream(self, source, **kw):
        """Iterator of `edgeflow.runtime.pipeline.Result` over a source URI (or Source); see `pipeline.stream`."""
        from edgeflow.runtime.pipeline import stream

        return stream(self, source, **kw)


def _hw(img: np.ndarray) -> str:
    return f"{img.shape[0]}x{img.shape[1]}"


def _first_line(e: BaseException) -> str:
    """The first line of a TVM error, without the traceback TVM puts before and after it."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("File ", "Traceback", "^", "at ", "0:", "1:"))]
    line = (useful or lines or [type(e).__name__])[-1]
    return one_line(Exception(line.split(" is false: ", 1)[-1]))[:300]


def _load_params(path: Path, order: list[str]) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        missing = [n for n in order if n not in npz.files]
        if missing:
            raise PackageError(f"params.npz lacks {missing[0]!r} named in the manifest's params order")
        return [np.ascontiguousarray(npz[n]) for n in order]


def _cuda_module(lib_dir: Path):
    """The device module of lib/kernels.cubin with the function info of lib/kernels.json."""
    import tvm_ffi

    create = tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True)
    if create is None:
        raise PackageError("this TVM runtime was built without CUDA; install the TVM runtime of the device image")
    meta = tvm_ffi.get_global_func("runtime.LoadMetaDataFromJSON")((lib_dir / "kernels.json").read_text())
    return create((lib_dir / "kernels.cubin").read_bytes(), "cubin", meta, {})
