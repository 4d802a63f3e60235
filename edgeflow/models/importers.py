"""Import the official FlowNet2 weights into edgeflow weight files.

Sources, told apart by their first bytes:
- the official Caffe release: `.caffemodel` (binary protobuf) and `.caffemodel.h5` (HDF5), the
  only source of the 3/8-width FlowNet2-s, -ss, -c, -cs, -css; see `edgeflow.models.caffe` for
  the layer names and how the Caffe conventions (BGR 0..255 input, fixed mean, flow/20) are met;
- flownet2-pytorch checkpoints (`{"state_dict", "epoch", "best_EPE"}`, read with
  `weights_only=True`): FlowNet2S and FlowNet2C (keys without prefix) and the stacks
  FlowNet2CS/CSS (`flownetc.`, `flownets_1.`, `flownets_2.`), whose names are ours already.
  They were converted from Caffe with conv1 already in RGB order, so no channel is touched.

Every tensor is checked against the model before anything is written; the first mismatch (in
file order) is one InputError naming the file and the layer, and the output is written
atomically, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from edgeflow.errors import InputError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# First key components of flownet2-pytorch stacks (FlowNet2, FlowNet2CS, FlowNet2CSS, ...).
PYTORCH_STAGES = ("flownetc", "flownets", "flownets_1", "flownets_2", "flownets_d", "flownetfusion")
_UPSAMPLE_BIAS = re.compile(r"(.*\.)?upsampled_flow\d_to_\d\.bias")


def detect_format(path: str | os.PathLike) -> str:
    """'caffemodel.h5' (HDF5 signature), 'flownet2-pytorch' (zip or pickle: torch.save), else
    'caffemodel' (protobuf has no signature)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head == HDF5_MAGIC:
        return "caffemodel.h5"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "flownet2-pytorch"
    return "caffemodel"


def _checkpoint_entries(path: Path, stages: str, model: str):
    """A flownet2-pytorch checkpoint -> ([(label, our key, tensor)] in file order, meta, the
    prefix its keys lack: 'flownets.' or 'flownetc.' for FlowNet2S/FlowNet2C, else '')."""
    import torch

    from edgeflow.models.stack import stage_names
    from edgeflow.models.weights import load_tensors

    blob = load_tensors(path, "PyTorch checkpoint")
    sd = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise InputError(f"{path}: not a flownet2-pytorch checkpoint (no state_dict of tensors)")
    names = stage_names(stages)
    prefix = ""
    if not any(k.split(".", 1)[0] in PYTORCH_STAGES for k in sd):  # FlowNet2S / FlowNet2C
        if len(names) > 1:
            raise InputError(f"{path}: holds a single network (keys like {next(iter(sd))!r}), "
                             f"but {model} is a stack of {len(names)}")
        prefix = names[0] + "."
    entries = []
    for key, value in sd.items():
        if _UPSAMPLE_BIAS.fullmatch(key):  # FlowNetC's upsampling has a (zero, untrained) bias
            if value.any():
                raise InputError(f"{path}: parameter {key!r} is a non-zero bias, which {model} cannot hold")
            continue
        entries.append((f"parameter {key!r}", prefix + key, value))
    meta = {k: blob[k] for k in ("epoch", "best_EPE") if isinstance(blob.get(k), (int, float))}
    return entries, meta, prefix


def _assemble(model, name: str, entries, source: str, expected) -> dict:
    """Check `entries` [(label, key, array or tensor)] against `model`'s parameters; returns the
    float32 state dict. `expected(key)` describes the source of a parameter nobody provided."""
    import numpy as np
    import torch

    own = model.state_dict()
    out = {}
    for label, key, value in entries:
        if key not in own:
            raise InputError(f"{source}: {label} has no place in {name} (weights of another model?)")
        t = value.float() if torch.is_tensor(value) else torch.from_numpy(np.array(value, np.float32))
        need = tuple(own[key].shape)
        if tuple(t.shape) != need:
            # Caffe's legacy 4-D blob shapes pad biases to (1, 1, 1, N)
            if t.dim() == 4 and t.numel() == own[key].numel() and t.shape[:4 - len(need)] == (1,) * (4 - len(need)):
                t = t.reshape(need)
            else:
                raise InputError(f"{source}: {label} has shape {tuple(t.shape)}; {name} needs {need} for {key}")
        if not np.isfinite(t.numpy()).all():
            raise InputError(f"{source}: {label} holds NaN or infinite values")
        out[key] = t
    missing = [k for k in own if k not in out]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"{source}: no {expected(missing[0])} for {name}'s {missing[0]} "
                         f"{tuple(own[missing[0]].shape)}{more}: the file is incomplete or for another model")
    return out


def load_official(path: str | os.PathLike, name: str):
    """Official weights at `path` in registry model `name` -> (FlowNet2 in eval mode, meta).

    meta names the source file, its sha256 and format, and what the source recorded (the
    Caffe mean, flownet2-pytorch's epoch and best_EPE).
    """
    from edgeflow.models import caffe
    from edgeflow.models.registry import spec
    from edgeflow.models.stack import FlowNet2
    from edgeflow.models.weights import sha256_file

    s = spec(name)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weight file {str(path)!r} does not exist")
    fmt = detect_format(path)
    if fmt == "flownet2-pytorch":
        entries, meta, prefix = _checkpoint_entries(path, s.stages, name)
        expected = lambda key: f"parameter {key.removeprefix(prefix)!r}"  # noqa: E731
    else:
        read = caffe.read_caffemodel_h5 if fmt == "caffemodel.h5" else caffe.read_caffemodel
        entries, meta = caffe.convert(read(path), s.stages, str(path), name)
        expected = lambda key: f"layer {caffe.describe(s.stages, key)}"  # noqa: E731
    model = FlowNet2(s.stages, s.width)
    model.load_state_dict(_assemble(model, name, entries, str(path), expected))
    return model.eval(), {"source": path.name, "source_sha256": sha256_file(path), "source_format": fmt, **meta}


def import_weights(path: str | os.PathLike, name: str, out: str | os.PathLike, *, half: bool = False) -> dict:
    """Convert official weights at `path` for model `name` into the edgeflow weight file `out`.

    half: store fp16 (half the size) instead of the exact fp32 values. Returns a summary:
    {"out", "model", "sha256", "params" (count), "meta"}. Written atomically.
    """
    from edgeflow.models.weights import save

    out = Path(out)
    if not out.parent.is_dir():
        raise InputError(f"-o {str(out)!r}: directory {str(out.parent)!r} does not exist")
    model, meta = load_official(path, name)
    digest = save(model, name, out, meta=meta, half=half)
    return {"out": str(out), "model": name, "sha256": digest,
            "params": sum(p.numel() for p in model.parameters()), "meta": meta}
