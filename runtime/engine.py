"""The Engine: a compiled package loaded into the TVM Relax VM, called on image pairs.

`engine(img1, img2)` takes uint8 HxWx3 BGR (or HxW gray) images of any size, both the same size,
and returns float32 HxWx2 forward flow in pixels at that size. Inside it runs three steps, timed
apart by the streaming pipeline: `prepare` (BGR/gray -> RGB, resize to the compiled size, /255,
NCHW), `run_tensor` (the network, on the package's device) and `finish` (resize the flow back
and scale its vectors by the resize ratios). Imports numpy, OpenCV and the TVM runtime only.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edgeflow.errors import InputError, PackageError

_SAVED = "edgeflow_main"  # the VM closure of "main" bound to the input buffers and parameters


class Engine:
    """A loaded package. Build it with `edgeflow.runtime.load(path, device=None)`."""

    def __init__(self, manifest: dict, directory: str | Path, device: str | None = None):
        import tvm.runtime
        from tvm.runtime.vm import VirtualMachine

        from edgeflow.runtime.package import device_index

        self.manifest = manifest
        self.directory = Path(directory)
        kind = manifest["target"]["kind"]
        self.device = str(device or kind)
        inp = manifest["input"]
        self.height, self.width = int(inp["height"]), int(inp["width"])
        self.input_dtype = np.dtype(inp.get("dtype", "float32"))
        self._dev = tvm.runtime.cuda(device_index(device)) if kind == "cuda" else tvm.runtime.cpu(0)

        lib = tvm.runtime.load_module(str(self.directory / "lib" / "model.so"))
        if kind == "cuda":
            lib.import_module(_cuda_module(self.directory / "lib"))
        self._vm = VirtualMachine(lib, self._dev)
        self._params = [tvm.runtime.tensor(a, self._dev) for a in _load_params(self.directory / "params.npz",
                                                                                manifest["params"]["order"])]
        shape = (1, 3, self.height, self.width)
        self._inputs = [tvm.runtime.empty(shape, str(self.input_dtype), self._dev) for _ in range(2)]
        self._vm.save_function("main", _SAVED, *self._inputs, *self._params)
        self._main = self._vm[_SAVED]
        self._staging = [np.empty(shape, self.input_dtype) for _ in range(2)]

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Engine({m['model'].get('name')} {self.height}x{self.width} {m.get('precision')} "
                f"for {m['target'].get('name')} on {self.device})")

    def __call__(self, img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
        """Forward flow float32 HxWx2 (pixels) from uint8 BGR/gray `img1` to `img2` (same size)."""
        img1, img2 = check_image(img1, "img1"), check_image(img2, "img2")
        if img1.shape[:2] != img2.shape[:2]:
            raise InputError(f"images differ in size: {_hw(img1)} and {_hw(img2)}")
        flow = self.run_tensor(self.prepare(img1), self.prepare(img2))
        return self.finish(flow, img1.shape[:2])

    def prepare(self, img: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 BGR/gray HxW[x3] -> array [1,3,H_net,W_net] RGB in [0,1] of the input dtype (`out`,
        e.g. a page-locked buffer, or a new array)."""
        img = check_image(img)
        img = resize(img, self.height, self.width)
        rgb = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB if img.ndim == 2 else cv2.COLOR_BGR2RGB)
        x = np.empty((1, 3, self.height, self.width), self.input_dtype) if out is None else out
        np.multiply(rgb.transpose(2, 0, 1), np.float32(1 / 255), out=x[0], casting="unsafe")
        return x

    def run_tensor(self, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
        """The network on prepared [1,3,H_net,W_net] inputs: flow float32 [2,H_net,W_net] (pixels)."""
        for buf, staging, x, name in zip(self._inputs, self._staging, (x1, x2), ("x1", "x2")):
            x = np.asarray(x)
            if x.shape != staging.shape:
                raise InputError(f"{name}: expected an array of shape {staging.shape}, got {x.shape}")
            if x.dtype != staging.dtype or not x.flags.c_contiguous:
                np.copyto(staging, x, casting="unsafe")
                x = staging
            buf.copyfrom(x)
        out = self._main()
        if not hasattr(out, "numpy"):  # a tuple of outputs: the flow is the first
            out = out[0]
        return out.numpy()[0].astype(np.float32, copy=False)

    def finish(self, flow: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Flow [2,H_net,W_net] -> float32 HxWx2 at `size` (H, W), vectors scaled by the resize ratios."""
        h, w = int(size[0]), int(size[1])
        flow = np.ascontiguousarray(flow.transpose(1, 2, 0), np.float32)
        if (h, w) == (self.height, self.width):
            return flow
        flow = resize(flow, h, w)
        flow[..., 0] *= w / self.width
        flow[..., 1] *= h / self.height
        return flow

    def stream(self, source, **kw):
        """Iterator of `edgeflow.runtime.pipeline.Result` over a source URI (or Source); see `pipeline.stream`."""
        from edgeflow.runtime.pipeline import stream

        return stream(self, source, **kw)


def check_image(img, name: str = "image") -> np.ndarray:
    """`img` as uint8 HxW (gray) or HxWx3 (BGR); HxWx1 becomes HxW. InputError otherwise."""
    if not isinstance(img, np.ndarray):
        raise InputError(f"{name}: expected a numpy uint8 image, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise InputError(f"{name}: expected a uint8 image, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) or 0 in img.shape:
        raise InputError(f"{name}: expected HxWx3 BGR or HxW gray, got shape {img.shape}")
    return img


def resize(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """`a` at height x width: INTER_AREA when shrinking both sides, INTER_LINEAR otherwise."""
    h, w = a.shape[:2]
    if (h, w) == (height, width):
        return a
    interp = cv2.INTER_AREA if height <= h and width <= w else cv2.INTER_LINEAR
    return cv2.resize(a, (width, height), interpolation=interp)


def _hw(img: np.ndarray) -> str:
    return f"{img.shape[0]}x{img.shape[1]}"


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
