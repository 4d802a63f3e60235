"""edgeflow weight files: save, verify and load, never half-way.

A weight file is `torch.save({"format": 1, "model": NAME, "state_dict": {...}, "meta": {...}})`
with fp16 or fp32 tensors, loaded with `weights_only=True`. The weights edgeflow ships lie in
`edgeflow/models/weights/NAME.pt`, listed with their sha256 in `weights/index.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from edgeflow.errors import InputError

WEIGHTS_DIR = Path(__file__).with_name("weights")
INDEX = WEIGHTS_DIR / "index.json"
FORMAT = 1


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped() -> dict[str, dict]:
    """{model name: index entry} of the weights shipped in the package."""
    return json.loads(INDEX.read_text()) if INDEX.exists() else {}


def resolve(name: str, weights) -> Path:
    """The weight file `weights` stands for, checked to exist: "default" (the shipped weights of
    `name`), the name of one of its shipped checkpoints (`checkpoints(name)`, e.g. "pruned-0.3"),
    or a path. Shipped files are checked against the sha256 in weights/index.json."""
    entry = shipped().get(name)
    named = checkpoints(name)
    if weights == "default" or weights in named:
        if entry is None:
            have = ", ".join(sorted(shipped())) or "none"
            raise InputError(f"no trained weights ship for {name!r} (shipped: {have}); "
                             f"pass weights=None for an untrained network")
        entry = entry if weights == "default" else named[weights]
        path = WEIGHTS_DIR / entry["file"]
        if sha256_file(path) != entry["sha256"]:
            raise InputError(f"{path}: sha256 does not match weights/index.json; reinstall edgeflow")
        return path
    path = Path(weights)
    if not path.is_file():
        also = f" (shipped weights of {name}: {', '.join(['default', *named])})" if entry else ""
        raise InputError(f"weight file {str(path)!r} does not exist{also}")
    return path


def checkpoints(name: str) -> dict[str, dict]:
    """{checkpoint name: index entry} of the named weights shipped beside `name`'s default ones."""
    return shipped().get(name, {}).get("checkpoints", {})


def load_tensors(path: str | os.PathLike, what: str = "weight file"):
    """`torch.load(path, weights_only=True)`; InputError naming `what` if that fails. torch's own
    message is not passed on where it advises loading with weights_only=False, which would run
    whatever code the file carries."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        text = str(e)
        if "weights_only" in text or "Weights only load failed" in text:
            detail = "it holds Python objects besides tensors, which edgeflow never unpickles"
        else:
            detail = f"{type(e).__name__}: {text.splitlines()[0] if text else 'no detail'}"
        raise InputError(f"{path}: not a readable {what} ({detail})") from None


def read(path: str | os.PathLike) -> dict:
    """The dict of an edgeflow weight file; InputError if it is not one."""
    blob = load_tensors(path)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or "state_dict" not in blob:
        raise InputError(f"{path}: not an edgeflow weight file (format {FORMAT}); "
                         f"use `edgeflow import-weights` for official checkpoints")
    return blob


def check_state_dict(model, state_dict: dict, source: str) -> None:
    """Raise InputError naming the first parameter of `model` that `state_dict` lacks or
    gives another shape, or the first key `state_dict` has that `model` does not."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in state_dict:
            raise InputError(f"{source}: missing parameter {key!r} {tuple(value.shape)}")
        if tuple(state_dict[key].shape) != tuple(value.shape):
            raise InputError(f"{source}: parameter {key!r} has shape {tuple(state_dict[key].shape)}, "
                             f"the model needs {tuple(value.shape)}")
    extra = [k for k in state_dict if k not in own]
    if extra:
        raise InputError(f"{source}: unexpected parameter {extra[0]!r} (and {len(extra) - 1} more)")


def load_into(model, name: str, weights) -> dict:
    """Load `weights` (see `resolve`) into `model` (registry `name`); returns the meta.

    A pruned network's file lists its layers' channel counts (meta `channels`, see
    `edgeflow.models.channels`): those layers of `model` are rebuilt with these counts first.
    Every count and shape is checked before anything changes, so a bad file leaves the model as it was.
    """
    import copy

    from edgeflow.models.channels import META_KEY, set_channels

    path = resolve(name, weights)
    blob = read(path)
    if blob.get("model") != name:
        raise InputError(f"{path}: weights are for model {blob.get('model')!r}, not {name!r}")
    sd = blob["state_dict"]
    channels = blob.get("meta", {}).get(META_KEY)
    if channels is not None:
        if not isinstance(channels, dict):
            raise InputError(f"{path}: meta {META_KEY!r} is not {{layer: [in, out]}}: {type(channels).__name__}")
        reshaped = copy.deepcopy(model)
        set_channels(reshaped, channels, str(path))
        check_state_dict(reshaped, sd, str(path))
        set_channels(model, channels, str(path))
    check_state_dict(model, sd, str(path))
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return blob.get("meta", {})


def save(model, name: str, path: str | os.PathLike, *, meta: dict | None = None, half: bool = True) -> str:
    """Write `model`'s weights as an edgeflow weight file, atomically; returns its sha256."""
    import torch

    sd = {k: (v.half() if half and v.is_floating_point() else v).detach().to("cpu", copy=True)
          for k, v in model.state_dict().items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save({"format": FORMAT, "model": name, "state_dict": sd, "meta": meta or {}}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sha256_file(path)


def ship_weights(path: str | os.PathLike, name: str, checkpoint: str | None = None) -> Path:
    """Install weight file `path` as the shipped weights of `name` (its default ones, or those
    named `checkpoint`, beside the default ones) and record its sha256."""
    import shutil

    blob = read(path)
    if blob.get("model") != name:
        raise InputError(f"{path}: weights are for model {blob.get('model')!r}, not {name!r}")
    index = shipped()
    if checkpoint is not None and name not in index:
        raise InputError(f"checkpoint {checkpoint!r}: {name!r} has no default weights to ship it beside")
    WEIGHTS_DIR.mkdir(exist_ok=True)
    dest = WEIGHTS_DIR / (f"{name}.pt" if checkpoint is None else f"{name}-{checkpoint}.pt")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(path, tmp)
    os.replace(tmp, dest)
    entry = {"file": dest.name, "sha256": sha256_file(dest), "meta": blob.get("meta", {})}
    if checkpoint is None:
        index[name] = {**entry, **({"checkpoints": checkpoints(name)} if checkpoints(name) else {})}
    else:
        index[name].setdefault("checkpoints", {})[checkpoint] = entry
    tmp_index = INDEX.with_name("index.json.tmp")
    tmp_index.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    os.replace(tmp_index, INDEX)
    return dest
