"""The official FlowNet2 Caffe weights: `.caffemodel` (protobuf) and `.caffemodel.h5` (HDF5).

No Caffe or protobuf dependency: a small wire-format decoder reads the few fields of caffe.proto
that carry weights (field numbers as in BVLC caffe and lmb-freiburg/flownet2
src/caffe/proto/caffe.proto):

    NetParameter      name = 1, layers = 2 (V1LayerParameter), layer = 100 (LayerParameter)
    LayerParameter    name = 1, type = 2 (string), blobs = 7
    V1LayerParameter  name = 4, type = 5 (enum; CONVOLUTION = 4, DECONVOLUTION = 39), blobs = 6
    BlobProto         num, channels, height, width = 1..4 (legacy 4-D shape), data = 5 (float),
                      shape = 7 (BlobShape: dim = 1, int64), double_data = 8 (double)

Caffe's HDF5 snapshots hold the same blobs as datasets `data/<layer>/<i>`.

Layer names (see ../shared/reference/flownet2-caffe): stage i of a stack is prefixed '' (first),
'net2_', 'net3_'; its flow upsampling layers twice ('net2_net2_upsample_flow6to5'). Predict
heads are `predict_conv6..2` in FlowNet2-s, -ss and stacked stages, `Convolution1..5` (1 = flow6)
in FlowNet2-S, -C, -c and the first stage of -cs/-css; either name is accepted.

The official networks' conventions, and what the import does about each:

- Input BGR in 0..255, scaled by Eltwise coeff 1/255 (0.0039216): our networks take RGB in [0, 1],
  so no weight is rescaled, and the input channels of every conv1 are reversed per image:
  channels 0:3 and 3:6 of FlowNetS's conv1, 0:3 of FlowNetC's (siamese) conv1, and 0:3, 3:6, 6:9
  (img1, img2, warped img2) of a stacked stage's 12-channel conv1. Its flow (9:11, u then v) and
  brightness error (11, a norm over colour channels) channels keep their order.
- Mean: the DataAugmentation layers `img0s_aug`/`img1s_aug` subtract a fixed per-channel mean of
  the training images (blob 2, shape 1x3x1x1, BGR, in [0, 1] units; blob 0 counts iterations,
  blob 1 is the per-pixel mean). The means cannot be folded into weights, so they are kept in the
  weight file's meta (`caffe_mean_rgb`), and `edgeflow.models.create` makes the model subtract
  them (`FlowNet2.input_mean`) instead of each pair's own mean (flownet2-pytorch's way).
  Other DataAugmentation layers of training nets (DataAugmentation1..3 of FlowNet2-css-ft-sd)
  hold only an iteration counter and are skipped.
- Flow scale: Caffe's predict layers output flow/20 (Eltwise coeff 20 at the output, coeff 0.05
  into the next stage), exactly our DIV_FLOW convention: no rescale.
- Flow upsampling layers (`upsample_flow*`) carry a bias blob that is never trained (lr_mult 0,
  constant 0); our layers have none, so it is dropped if zero and refused otherwise.
- Final resample: Resample LINEAR from the flow2 resolution with half-pixel centres, equal to our
  bilinear `align_corners=False` upsampling at the adapted size (multiples of 64); resizing to
  other sizes and the vector scaling of `scale_conv1` are the caller's (runtime's) job, so a
  `scale_conv1` layer in a file is ignored.
- Matched by the model itself (stack.py, ops.py): between stages the Accum layer's corner-aligned
  bilinear flow upsampling, and FlowWarp's border (0 where the sample point is outside the image,
  right/bottom neighbours clamped to the edge).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeflow.errors import InputError, MissingDependency
from edgeflow.models.stack import stage_names

V1_TYPES = {4: "Convolution", 39: "Deconvolution"}
MEAN_LAYERS = ("img0s_aug", "img1s_aug")
IGNORED_LAYERS = ("scale_conv1",)
_CONVS = ("conv1", "conv2", "conv3", "conv3_1", "conv4", "conv4_1", "conv5", "conv5_1", "conv6", "conv6_1")


@dataclass
class CaffeLayer:
    """One layer of a Caffe net that holds blobs: `type` is None where the file has no types (HDF5)."""

    name: str
    type: str | None
    blobs: list[np.ndarray]


class _Malformed(Exception):
    """Bytes that are not the protobuf message expected. For a length-delimited field that runs
    past the end, `field` is its number and `start` the offset of its bytes."""

    def __init__(self, message: str, field: int | None = None, start: int | None = None):
        super().__init__(message)
        self.field = field
        self.start = start


# ---- protobuf wire format -------------------------------------------------------------------

def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _Malformed(f"varint runs past the end at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed(f"varint longer than 10 bytes at byte {pos}")


def _fields(buf: memoryview, start: int, end: int):
    """Yield (field number, wire type, value) for the message in buf[start:end]. The value is an
    int for varints, the offset of the bytes for fixed 32/64-bit values, and a (begin, end) span
    for length-delimited ones."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Malformed(f"field number 0 at byte {pos}")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = pos, pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = (pos, pos + n), pos + n
        elif wire == 5:
            value, pos = pos, pos + 4
        else:
            raise _Malformed(f"wire type {wire} (field {field}) at byte {pos}")
        if pos > end:
            raise _Malformed(f"field {field} runs past the end ({pos} > {end} bytes)", field,
                             value[0] if wire == 2 else None)
        yield field, wire, value


def _string(buf: memoryview, span: tuple[int, int]) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


def _numbers(buf: memoryview, wire: int, value, dtype: str) -> np.ndarray:
    """A packed (wire 2) or single (wire 1/5) float or double field as a numpy array."""
    size = np.dtype(dtype).itemsize
    if wire == 2:
        begin, end = value
        if (end - begin) % size:
            raise _Malformed(f"packed {dtype} field of {end - begin} bytes")
        return np.frombuffer(buf, dtype=dtype, count=(end - begin) // size, offset=begin)
    if wire in (1, 5) and size == (8 if wire == 1 else 4):
        return np.frombuffer(buf, dtype=dtype, count=1, offset=value)
    raise _Malformed(f"{dtype} field with wire type {wire}")


def _blob(buf: memoryview, span: tuple[int, int]) -> np.ndarray:
    """A BlobProto as a float32 array of its shape (the legacy num/channels/height/width if it
    has no BlobShape)."""
    legacy = [0, 0, 0, 0]
    shape = None
    parts: list[np.ndarray] = []
    for field, wire, value in _fields(buf, *span):
        if field in (1, 2, 3, 4) and wire == 0:
            legacy[field - 1] = value
        elif field == 7 and wire == 2:
            shape = []
            for f, w, v in _fields(buf, *value):
                if f == 1 and w == 0:
                    shape.append(v)
                elif f == 1 and w == 2:
                    pos = v[0]
                    while pos < v[1]:
                        d, pos = _varint(buf, pos)
                        shape.append(d)
        elif field == 5:
            parts.append(_numbers(buf, wire, value, "<f4"))
        elif field == 8:
            parts.append(_numbers(buf, wire, value, "<f8").astype(np.float32))
    data = np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)
    dims = tuple(shape) if shape is not None else tuple(legacy) if any(legacy) else (data.size,)
    if int(np.prod(dims)) != data.size:
        raise _Malformed(f"blob of shape {dims} holds {data.size} values")
    return data.reshape(dims)


def _layer(buf: memoryview, span: tuple[int, int], v1: bool) -> CaffeLayer:
    name_field, type_field, blobs_field = (4, 5, 6) if v1 else (1, 2, 7)
    name, kind, blob_spans = None, None, []
    for field, wire, value in _fields(buf, *span):
        if field == name_field and wire == 2:
            name = _string(buf, value)
        elif field == type_field and v1 and wire == 0:
            kind = V1_TYPES.get(value, f"V1 type {value}")
        elif field == type_field and not v1 and wire == 2:
            kind = _string(buf, value)
        elif field == blobs_field and wire == 2:
            blob_spans.append(value)
    if name is None:
        raise _Malformed(f"a layer without a name at byte {span[0]}")
    return CaffeLayer(name, kind, [_blob(buf, s) for s in blob_spans])


def _partial_name(buf: memoryview, start: int, v1: bool) -> str | None:
    """The name of the layer whose bytes begin at `start` but run past the end, if readable."""
    try:
        for field, wire, value in _fields(buf, start, len(buf)):
            if field == (4 if v1 else 1) and wire == 2:
                return _string(buf, value)
    except _Malformed:
        pass
    return None


def read_caffemodel(path: str | os.PathLike) -> list[CaffeLayer]:
    """The layers with blobs of a binary `.caffemodel` (NetParameter), in file order.

    A truncated or corrupt file is an InputError naming the layer where it breaks.
    """
    buf = memoryview(Path(path).read_bytes())
    layers: list[CaffeLayer] = []

    def broken(e: _Malformed, start: int | None, v1: bool) -> InputError:
        name = _partial_name(buf, start, v1) if start is not None else None
        where = f" in layer {name!r}" if name else (f" after layer {layers[-1].name!r}" if layers else "")
        return InputError(f"{path}: truncated or corrupt .caffemodel{where} ({e})")

    try:
        for field, wire, value in _fields(buf, 0, len(buf)):
            if field in (2, 100) and wire == 2:
                try:
                    layer = _layer(buf, value, v1=field == 2)
                except _Malformed as e:
                    raise broken(e, value[0], field == 2) from None
                if layer.blobs:
                    layers.append(layer)
    except _Malformed as e:
        raise broken(e, e.start if e.field in (2, 100) else None, e.field == 2) from None
    if not layers:
        raise InputError(f"{path}: not a Caffe model: no layer with weights found")
    return layers


def read_caffemodel_h5(path: str | os.PathLike) -> list[CaffeLayer]:
    """The layers with blobs of a Caffe HDF5 snapshot (`data/<layer>/<0|1|...>`), by name."""
    try:
        import h5py
    except ImportError:
        raise MissingDependency("reading .caffemodel.h5 needs h5py: pip install h5py") from None
    layers = []
    name = None
    try:
        with h5py.File(path, "r") as f:
            data = f.get("data")
            if not isinstance(data, h5py.Group):
                raise InputError(f"{path}: not a Caffe HDF5 snapshot (no group 'data')")
            for name in data:
                group = data[name]
                if not isinstance(group, h5py.Group) or not all(k.isdigit() for k in group):
                    raise InputError(f"{path}: layer {name!r} is not a group of numbered blobs")
                blobs = [np.asarray(group[k], dtype=np.float32) for k in sorted(group, key=int)]
                if blobs:
                    layers.append(CaffeLayer(name, None, blobs))
    except (OSError, KeyError, ValueError) as e:
        where = f" at layer {name!r}" if name else ""
        raise InputError(f"{path}: truncated or corrupt HDF5 file{where} ({str(e).splitlines()[0]})") from None
    if not layers:
        raise InputError(f"{path}: not a Caffe model: no layer with weights found")
    return layers


# ---- mapping to our parameters --------------------------------------------------------------

def layer_map(stages: str) -> dict[str, str]:
    """{Caffe layer name: our module path (e.g. 'flownets_1.conv1.0')} for a FlowNet2 of
    `stages` ('s', 'ss', 'c', 'cs', 'css'). Predict heads appear under both official names."""
    out = {}
    for i, (kind, stage) in enumerate(zip(stages, stage_names(stages))):
        p = f"net{i + 1}_" if i else ""
        for conv in _CONVS + (("conv_redir",) if kind == "c" else ()):
            out[p + conv] = f"{stage}.{conv}.0"
        for k in (5, 4, 3, 2):
            out[f"{p}deconv{k}"] = f"{stage}.deconv{k}.0"
        for k in (6, 5, 4, 3, 2):
            out[f"{p}predict_conv{k}"] = out[f"{p}Convolution{7 - k}"] = f"{stage}.predict_flow{k}"
        for k in (6, 5, 4, 3):
            out[f"{p}{p}upsample_flow{k}to{k - 1}"] = f"{stage}.upsampled_flow{k}_to_{k - 1}"
    return out


def image_groups(stages: str, module: str) -> int:
    """How many leading 3-channel BGR image groups the input of conv1 `module` has (0 if the
    module is not a conv1): FlowNetS 2, FlowNetC 1 (siamese), a stacked stage 3."""
    stage, _, rest = module.partition(".")
    if rest != "conv1.0":
        return 0
    index = stage_names(stages).index(stage)
    return 3 if index else (1 if stages[0] == "c" else 2)


def _is_augmentation(layer: CaffeLayer) -> bool:
    """A DataAugmentation layer: by type, or (HDF5, no types) by its blobs: an iteration counter
    (1x1x1x1), then with recompute_mean the per-pixel (1xCxHxW) and per-channel (1xCx1x1) means."""
    if layer.type is not None:
        return layer.type == "DataAugmentation"
    return len(layer.blobs) in (1, 3) and layer.blobs[0].size == 1


def convert(layers: list[CaffeLayer], stages: str, source: str, model: str):
    """Caffe layers -> ([(label, our parameter key, float32 array)] in file order, meta).

    Applies the conventions of the module docstring; raises InputError naming the first layer
    (in file order) that has no place in `model` or the wrong type or number of blobs.
    """
    names = layer_map(stages)
    entries = []
    taken: dict[str, str] = {}
    mean = {}
    for layer in layers:
        label = f"layer {layer.name!r}"
        if layer.name in IGNORED_LAYERS or (layer.name not in names and _is_augmentation(layer)):
            if layer.name in MEAN_LAYERS and len(layer.blobs) == 3 and layer.blobs[2].size == 3:
                mean["img1" if layer.name == MEAN_LAYERS[0] else "img2"] = [
                    round(float(v), 6) for v in layer.blobs[2].reshape(3)[::-1]]
            continue
        module = names.get(layer.name)
        if module is None:
            raise InputError(f"{source}: {label} has no place in {model} (weights of another model?)")
        if module in taken:
            raise InputError(f"{source}: layers {taken[module]!r} and {layer.name!r} both hold {module}")
        taken[module] = layer.name
        upsample = ".upsampled_flow" in module
        want = "Deconvolution" if upsample or ".deconv" in module else "Convolution"
        if layer.type is not None and layer.type != want:
            raise InputError(f"{source}: {label} is a {layer.type}, {model} needs a {want} for {module}")
        if len(layer.blobs) != 2 and not (upsample and len(layer.blobs) == 1):
            raise InputError(f"{source}: {label} has {len(layer.blobs)} blobs, expected weight and bias")
        weight = layer.blobs[0]
        groups = image_groups(stages, module)
        if groups and weight.ndim == 4 and weight.shape[1] >= 3 * groups:
            weight = weight.copy()
            for g in range(groups):
                weight[:, 3 * g:3 * g + 3] = weight[:, 3 * g:3 * g + 3][:, ::-1]
        entries.append((f"{label} blob 0", f"{module}.weight", weight))
        if upsample:
            if len(layer.blobs) == 2 and np.any(layer.blobs[1]):
                raise InputError(f"{source}: {label} has a non-zero bias, which {module} cannot hold")
        else:
            entries.append((f"{label} blob 1", f"{module}.bias", layer.blobs[1]))
    meta = {"caffe_mean_rgb": mean} if mean else {}
    return entries, meta


def describe(stages: str, key: str) -> str:
    """The Caffe layer(s) that should hold our parameter `key`, for error messages."""
    module = key.rsplit(".", 1)[0]
    found = [name for name, m in layer_map(stages).items() if m == module]
    return " or ".join(repr(n) for n in found) or repr(key)
