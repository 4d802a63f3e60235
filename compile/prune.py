"""Structured channel pruning of FlowNet2 networks, then distillation from the unpruned net.

    pruned = prune(model, 0.3)                      # a new module; `model` is left as it was
    pruned.pruning                                  # the report the package manifest records
    save(pruned, "flownet2-s", "pruned.pt")         # reloads with models.create(name, weights=...)

Pruning removes whole output channels of convolutions and deconvolutions, and with them the
matching input channels of every layer that reads them, through Torch-Pruning's dependency graph
(which follows the decoder's concatenations: encoder features, deconvolution outputs and
upsampled flows). Each stage of a stack is pruned on its own graph. Every prunable layer loses
`ratio` of its channels (the count kept rounded to a multiple of `round_to`), those of least
importance: "l1", the L1 norm of the channel's weights in
all layers of its group; or "taylor", |w * dL/dw| summed the same way, with L half the squared
norm of the final flow (pixels) on distillation frames: the first-order change of the output if the
channel went (no labels needed, so it works on unlabelled frames). Left whole: the 2-channel flow
predictors and flow upsamplers (the outputs), the network inputs, and in FlowNetC the siamese
tower and `conv_redir` (the correlation is a custom op the graph cannot see through; FACTS.md).

Distillation then trains the pruned net (all stages) to reproduce the unpruned net's flow
pyramid (FlowNet's multi-scale EPE, flow2..flow6, against the teacher instead of ground truth) on
generated pairs (`edgeflow.synth`) or on consecutive frames of the user's own directory
(`calibration=`), with flips and order swaps. Its EPE against the unpruned net on held-out
generated pairs is measured right after pruning and after distillation.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

from edgeflow.errors import InputError, MissingDependency

IMPORTANCES = ("l1", "taylor")
FLOW_LAYERS = ("predict_flow", "upsampled_flow")  # name prefixes of the layers never pruned
CORRELATION_LAYERS = ("conv1", "conv2", "conv3", "conv_redir")  # FlowNetC: kept whole
ROUND_TO = 8  # channel multiple: flownet2-s at 0.3 runs 1.4x faster on the host with it (README)
DISTILL_SIZE = (256, 320)
TRACE_SIZE = (128, 192)  # input size of the dependency-graph trace (shapes only)
TAYLOR_BATCHES = 4
VALIDATION_PAIRS = 8


def prune(model, ratio: float, *, importance: str = "l1", calibration=None, distill_steps: int = 200,
          batch: int = 4, lr: float = 1e-4, size: tuple[int, int] = DISTILL_SIZE, round_to: int = ROUND_TO,
          validation_pairs: int = VALIDATION_PAIRS, seed: int = 0,
          progress: Callable[[str], None] | None = None):
    """A pruned, distilled copy of FlowNet2 `model`; its `.pruning` attribute is the report.

    ratio: share of the channels each prunable layer loses, in (0, 1). importance: "l1" or
    "taylor". calibration: None (generated pairs) or a directory of the user's frames
    (`edgeflow.compile.calibration.read_frames`, checked before anything is computed).
    distill_steps: Adam steps of `batch` pairs at `size` (H, W, multiples of 64), learning rate
    `lr` with a cosine decay; 0 skips distillation. round_to: the channel counts kept are
    multiples of it (1: any count), which vectorised kernels run faster.
    validation_pairs: held-out generated pairs at `size` on which the EPE (px) against the
    unpruned net is measured. seed: of the distillation pairs. progress: called with one line
    per stage of the work.

    Report keys: ratio, importance, round_to, stages, kept_whole (layer names), parameters and
    macs {"before", "after"} (MACs of the convolutions for one pair at `size`, see
    `edgeflow.compile.cost`), distillation {steps, batch, lr, size, loss, data, seconds},
    epe_vs_unpruned {after_pruning, after_distillation, pairs, size, data}.
    """
    import copy

    from edgeflow.compile.calibration import read_frames
    from edgeflow.compile.cost import cost

    say = progress or (lambda msg: None)
    _check_args(model, ratio, importance, distill_steps, batch, lr, size, round_to, validation_pairs)
    frames = read_frames(calibration, size) if calibration is not None else None
    tp = _torch_pruning()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    student = copy.deepcopy(model).eval().requires_grad_(True)
    pairs = PairSource(frames, size, seed, origin=calibration)
    before = cost(teacher, size)

    say(f"prune    {ratio:g} of the channels of every prunable layer by {importance} importance, "
        f"{len(student.names)} stage(s) on their own")
    if importance == "taylor":
        _flow_energy_gradients(student, pairs, batch)
    kept = remove_channels(student, ratio, importance, round_to, tp)
    student.zero_grad(set_to_none=True)
    after = cost(student, size)
    say(f"         parameters {before['parameters'] / 1e6:.2f} M -> {after['parameters'] / 1e6:.2f} M, "
        f"MACs {before['macs'] / 1e9:.3f} G -> {after['macs'] / 1e9:.3f} G at {size[0]}x{size[1]}")

    heldout = _validation_pairs(validation_pairs, size)
    epe_pruned = epe_against(student, teacher, heldout)
    say(f"         EPE against the unpruned net {epe_pruned:.4f} px on {validation_pairs} held-out pairs")
    t0 = time.time()
    if distill_steps:
        distill(student, teacher, pairs, steps=distill_steps, batch=batch, lr=lr, progress=say)
        epe_distilled = epe_against(student, teacher, heldout)
        say(f"         EPE against the unpruned net {epe_pruned:.4f} -> {epe_distilled:.4f} px after distillation")
    else:
        epe_distilled = epe_pruned
    student.pruning = {
        "ratio": float(ratio), "importance": importance, "round_to": round_to, "stages": list(student.names),
        "kept_whole": kept,
        "parameters": {"before": before["parameters"], "after": after["parameters"]},
        "macs": {"before": before["macs"], "after": after["macs"], "input_size": list(size)},
        "distillation": {"steps": distill_steps, "batch": batch, "lr": lr, "size": list(size),
                         "loss": "multi-scale EPE (flow2..flow6) against the unpruned net",
                         "data": pairs.description, "seconds": round(time.time() - t0, 1)},
        "epe_vs_unpruned": {"after_pruning": round(epe_pruned, 6), "after_distillation": round(epe_distilled, 6),
                            "pairs": validation_pairs, "size": list(size),
                            "data": "held-out generated pairs (edgeflow.training.heldout_set)"},
    }
    return student.eval()


def remove_channels(model, ratio: float, importance: str, round_to: int, tp) -> list[str]:
    """Prune every stage of FlowNet2 `model` in place (see the module doc); returns the names of
    the convolutions kept whole. For "taylor", the parameters' `.grad` must hold dL/dw."""
    import torch

    from edgeflow.models.flownet import FlowNetC

    scorer = (tp.importance.GroupMagnitudeImportance(p=1) if importance == "l1"
              else tp.importance.GroupTaylorImportance())
    kept = []
    for stage in model.names:
        net = getattr(model, stage)
        whole = {n: m for n, m in net.named_modules() if n.startswith(FLOW_LAYERS) and hasattr(m, "weight")}
        if isinstance(net, FlowNetC):
            whole.update({f"{n}.0": getattr(net, n)[0] for n in CORRELATION_LAYERS})
        channels = 6 if isinstance(net, FlowNetC) else net.conv1[0].in_channels
        pruner = tp.pruner.BasePruner(net, torch.zeros(1, channels, *TRACE_SIZE), scorer, pruning_ratio=ratio,
                                      ignored_layers=list(whole.values()),
                                      round_to=round_to if round_to > 1 else None)
        pruner.step()
        kept += [f"{stage}.{n}" for n in whole]
    return kept


def distill(student, teacher, pairs, *, steps: int, batch: int, lr: float, progress=None) -> None:
    """Train `student` (all stages) for `steps` Adam steps to reproduce `teacher`'s flow pyramid
    on `batch` pairs per step from `pairs` (a PairSource); cosine learning-rate decay from `lr`."""
    import torch

    say = progress or (lambda msg: None)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    every = max(1, steps // 10)
    running, t0 = 0.0, time.time()
    student.train()
    for step in range(steps):
        img1, img2 = pairs.batch(batch)
        with torch.no_grad():
            target = teacher.pyramids(img1, img2)
        loss = distill_loss(student.pyramids(img1, img2), target)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if (step + 1) % every == 0 or step + 1 == steps:
            n = (step % every) + 1
            say(f"distill  step {step + 1}/{steps}  loss {running / n:.4f}  ({(time.time() - t0) / (step + 1):.2f} s/step)")
            running = 0.0
    student.eval()


def distill_loss(pyramid, target):
    """Multi-scale EPE of a flow pyramid [flow2..flow6] against the teacher's (same shapes, px/20):
    per level the EPE summed over its pixels, weighted as in training (`LOSS_WEIGHTS`), per pair."""
    import torch

    from edgeflow.training import LOSS_WEIGHTS

    total = 0.0
    for weight, pred, want in zip(LOSS_WEIGHTS, pyramid, target):
        total = total + weight * torch.norm(pred - want, p=2, dim=1).sum() / pred.shape[0]
    return total


def epe_against(model, reference, pairs) -> float:
    """Mean EPE (px) of `model`'s flow against `reference`'s on [(img1, img2)] float [1,3,H,W] pairs."""
    import torch

    errs = []
    with torch.no_grad():
        for img1, img2 in pairs:
            diff = model(img1, img2) - reference(img1, img2)
            errs.append(float(torch.norm(diff, p=2, dim=1).mean()))
    return sum(errs) / len(errs)


class PairSource:
    """Distillation inputs: float RGB [B,3,H,W] x2 in [0,1] at `size`.

    frames None: pairs generated by `edgeflow.synth.generate_pair`. Otherwise a list of uint8
    HxWx3 BGR frames at `size` (read from `origin`, named in `description`): random consecutive
    pairs, each flipped (horizontally, vertically) and swapped in order at random. The teacher
    sees the same pair, so its flow stays the target.
    """

    def __init__(self, frames: list | None, size: tuple[int, int], seed: int = 0, origin=None):
        import numpy as np

        self.frames, self.size = frames, tuple(size)
        self.rng = np.random.default_rng([seed, 0x5EED])
        self.description = ("generated pairs (edgeflow.synth)" if frames is None else
                            f"{len(frames)} calibration frames from {str(origin)!r}, consecutive pairs, flips and swaps")

    def batch(self, n: int):
        import torch

        from edgeflow.training import to_tensor_pair

        pairs = [to_tensor_pair(*self._pair()) for _ in range(n)]
        return torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])

    def _pair(self):
        from edgeflow.synth import generate_pair

        if self.frames is None:
            return generate_pair(self.rng, self.size)[:2]
        i = int(self.rng.integers(len(self.frames) - 1))
        a, b = self.frames[i], self.frames[i + 1]
        if self.rng.random() < 0.5:
            a, b = b, a
        if self.rng.random() < 0.5:
            a, b = a[:, ::-1], b[:, ::-1]
        if self.rng.random() < 0.5:
            a, b = a[::-1], b[::-1]
        return a, b


def manifest_entry(model) -> dict:
    """The manifest's "pruning" entry for a module about to be compiled: {"ratio": 0.0} for an
    unpruned net, else its report plus `channels` ({layer: [in, out]})."""
    from edgeflow.models.channels import layer_channels

    report = getattr(model, "pruning", None)
    return {"ratio": 0.0} if not report else {**report, "channels": layer_channels(model)}


def save(model, name: str, path: str | os.PathLike) -> str:
    """Write pruned `model` (registry `name`) as an edgeflow weight file (fp32) whose meta holds
    its report and channel counts, atomically (creating its folder); returns its sha256."""
    from pathlib import Path

    from edgeflow.models import PRUNING_KEY
    from edgeflow.models.channels import META_KEY, layer_channels
    from edgeflow.models.weights import save as save_weights

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_weights(model, name, path, half=False,
                        meta={PRUNING_KEY: model.pruning, META_KEY: layer_channels(model)})


def _flow_energy_gradients(model, pairs, batch: int) -> None:
    """Accumulate dL/dw in `.grad` over TAYLOR_BATCHES batches, L = half the squared norm of the
    final flow (px), summed over pixels, per pair."""
    model.zero_grad(set_to_none=True)
    for _ in range(TAYLOR_BATCHES):
        img1, img2 = pairs.batch(batch)
        (0.5 * model(img1, img2).pow(2).sum() / batch).backward()


def _validation_pairs(count: int, size: tuple[int, int]) -> list:
    from edgeflow.training import heldout_set, to_tensor_pair

    return [to_tensor_pair(img1, img2) for img1, img2, _ in heldout_set(count, size)]


def _check_args(model, ratio, importance, distill_steps, batch, lr, size, round_to, validation_pairs) -> None:
    if not hasattr(model, "pyramids") or not hasattr(model, "names"):
        raise InputError(f"model: expected a FlowNet2 network (edgeflow.models.create), got {type(model).__name__}")
    if not 0 < ratio < 1:
        raise InputError(f"ratio={ratio!r}: expected the share of channels to remove, 0 < ratio < 1 (e.g. 0.3)")
    if importance not in IMPORTANCES:
        raise InputError(f"importance={importance!r}: expected one of {', '.join(IMPORTANCES)}")
    if distill_steps < 0 or batch < 1 or not lr > 0:
        raise InputError(f"distill_steps={distill_steps}, batch={batch}, lr={lr}: expected steps >= 0, "
                         f"batch >= 1 and lr > 0")
    h, w = size
    if h <= 0 or w <= 0 or h % 64 or w % 64:
        raise InputError(f"size={h}x{w}: expected positive multiples of 64, e.g. 256x320")
    if not isinstance(round_to, int) or round_to < 1:
        raise InputError(f"round_to={round_to!r}: expected a positive channel multiple (1: any count)")
    if validation_pairs < 1:
        raise InputError(f"validation_pairs={validation_pairs}: expected at least 1")


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise MissingDependency("pruning needs torch-pruning; install it with `pip install 'edgeflow[compile]'`") from None
    return torch_pruning
