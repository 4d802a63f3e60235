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
generated pairs (`edgeflow.synth`, FlyingChairs-like or, for a share `natural`, the natural
style) or on consecutive frames of the user's own directory (`calibration=`), with flips and
order swaps. On generated pairs the ground truth is known, and `truth` > 0 adds the same loss
against it (weighted by `truth`), so that the student learns the flow, not only the teacher's
errors. Its EPE against the unpruned net on held-out generated pairs is measured right after
pruning and after distillation.
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
          natural: float = 0.0, truth: float = 0.0, validation_pairs: int = VALIDATION_PAIRS, seed: int = 0,
          progress: Callable[[str], None] | None = None, checkpoint: Callable | None = None,
          checkpoint_s: float = 600.0, resume=None):
    """A pruned, distilled copy of FlowNet2 `model`; its `.pruning` attribute is the report.

    ratio: share of the channels each prunable layer loses, in (0, 1). importance: "l1" or
    "taylor". calibration: None (generated pairs) or a directory of the user's frames
    (`edgeflow.compile.calibration.read_frames`, checked before anything is computed).
    distill_steps: Adam steps of `batch` pairs at `size` (H, W, multiples of 64), learning rate
    `lr` with a cosine decay; 0 skips distillation. round_to: the channel counts kept are
    multiples of it (1: any count), which vectorised kernels run faster. natural: share of the
    generated distillation pairs in the natural style (0..1). truth: weight of the loss against
    the generated pairs' ground truth (0: teacher only; needs generated pairs).
    validation_pairs: held-out generated pairs at `size` on which the EPE (px) against the
    unpruned net is measured. seed: of the distillation pairs. progress: called with one line
    per stage of the work. checkpoint: called with the student (its report saying how many
    steps it has) every `checkpoint_s` seconds of distillation, to save it where a run may be cut.
    resume: such a checkpoint of the same pruning of `model` (`models.create(name, weights=FILE)`):
    its channels stay, and its distillation goes on from the step it reached to `distill_steps`
    on new pairs (Adam's moments start afresh).

    Report keys: ratio, importance, round_to, stages, kept_whole (layer names), parameters and
    macs {"before", "after"} (MACs of the convolutions for one pair at `size`, see
    `edgeflow.compile.cost`), distillation {steps, batch, lr, size, loss, data, seconds},
    epe_vs_unpruned {after_pruning, after_distillation (None in a checkpoint), pairs, size, data}.
    """
    import copy

    from edgeflow.compile.calibration import read_frames
    from edgeflow.compile.cost import cost

    say = progress or (lambda msg: None)
    _check_args(model, ratio, importance, distill_steps, batch, lr, size, round_to, validation_pairs)
    if not 0 <= natural <= 1 or truth < 0 or (truth and calibration is not None):
        raise InputError(f"natural={natural!r}, truth={truth!r}: expected 0 <= natural <= 1 and truth >= 0, "
                         f"truth only on generated pairs (no calibration frames)")
    frames = read_frames(calibration, size) if calibration is not None else None
    done, seconds = _check_resume(resume, ratio, importance, round_to, distill_steps)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    pairs = PairSource(frames, size, seed, origin=calibration, natural=natural, part=done)
    before = cost(teacher, size)
    heldout = _validation_pairs(validation_pairs, size)
    if resume is None:
        student = copy.deepcopy(model).eval().requires_grad_(True)
        say(f"prune    {ratio:g} of the channels of every prunable layer by {importance} importance, "
            f"{len(student.names)} stage(s) on their own")
        if importance == "taylor":
            _flow_energy_gradients(student, pairs, batch)
        kept = remove_channels(student, ratio, importance, round_to, _torch_pruning())
        student.zero_grad(set_to_none=True)
        epe_pruned = epe_against(student, teacher, heldout)
    else:
        student = copy.deepcopy(resume).eval().requires_grad_(True)
        kept, epe_pruned = resume.pruning["kept_whole"], resume.pruning["epe_vs_unpruned"]["after_pruning"]
        say(f"resume   the distillation of a pruned {ratio:g} checkpoint at step {done}/{distill_steps}")
    after = cost(student, size)
    say(f"         parameters {before['parameters'] / 1e6:.2f} M -> {after['parameters'] / 1e6:.2f} M, "
        f"MACs {before['macs'] / 1e9:.3f} G -> {after['macs'] / 1e9:.3f} G at {size[0]}x{size[1]}")
    say(f"         EPE against the unpruned net {epe_pruned:.4f} px on {validation_pairs} held-out pairs "
        f"after pruning")
    loss = "multi-scale EPE (flow2..flow6) against the unpruned net" + (
        f" + {truth:g} x the same against the ground truth" if truth else "")
    data = pairs.description
    if resume is not None:  # a resumed run may have changed its loss or data: say what each part used
        was = resume.pruning["distillation"]
        loss, data = ((f"steps 1-{done}: {was[k]}; then: {now}" if was[k] != now else now)
                      for k, now in (("loss", loss), ("data", data)))

    def report(steps: int, seconds: float, epe_distilled: float | None) -> dict:
        return {
            "ratio": float(ratio), "importance": importance, "round_to": round_to, "stages": list(student.names),
            "kept_whole": kept,
            "parameters": {"before": before["parameters"], "after": after["parameters"]},
            "macs": {"before": before["macs"], "after": after["macs"], "input_size": list(size)},
            "distillation": {"steps": steps, "batch": batch, "lr": lr, "size": list(size), "loss": loss,
                             "data": data, "seconds": round(seconds, 1)},
            "epe_vs_unpruned": {"after_pruning": round(epe_pruned, 6),
                                "after_distillation": None if epe_distilled is None else round(epe_distilled, 6),
                                "pairs": validation_pairs, "size": list(size),
                                "data": "held-out generated pairs (edgeflow.training.heldout_set)"},
        }

    t0 = time.time() - seconds
    epe_distilled = epe_pruned
    if distill_steps:
        def save_point(step: int) -> None:
            student.pruning = report(step, time.time() - t0, None)
            checkpoint(student)
            say(f"         checkpoint after {step} steps")

        distill(student, teacher, pairs, steps=distill_steps, batch=batch, lr=lr, truth=truth, progress=say,
                checkpoint=save_point if checkpoint else None, checkpoint_s=checkpoint_s, first=done)
        epe_distilled = epe_against(student, teacher, heldout)
        say(f"         EPE against the unpruned net {epe_pruned:.4f} -> {epe_distilled:.4f} px after distillation")
    student.pruning = report(distill_steps, time.time() - t0, epe_distilled)
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


def distill(student, teacher, pairs, *, steps: int, batch: int, lr: float, truth: float = 0.0, progress=None,
            checkpoint: Callable[[int], None] | None = None, checkpoint_s: float = 600.0, first: int = 0) -> None:
    """Train `student` (all stages) for Adam steps `first`..`steps` to reproduce `teacher`'s flow
    pyramid on `batch` pairs per step from `pairs` (a PairSource), plus `truth` x the same loss
    against the pairs' ground truth; cosine learning-rate decay from `lr` over `steps`. Progress
    at least every tenth of the run and every two minutes; `checkpoint(steps done)` every
    `checkpoint_s` seconds."""
    import torch

    from edgeflow.training import multiscale_loss

    say = progress or (lambda msg: None)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    every = max(1, steps // 10)
    running, n, t0 = 0.0, 0, time.time()
    said = saved = t0
    student.train()
    for step in range(first, steps):
        img1, img2, flow = pairs.batch(batch)
        with torch.no_grad():
            target = teacher.pyramids(img1, img2)
        pyramid = student.pyramids(img1, img2)
        loss = distill_loss(pyramid, target)
        if truth:
            loss = loss + truth * multiscale_loss(pyramid, flow)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running, n = running + loss.item(), n + 1
        now = time.time()
        if (step + 1) % every == 0 or step + 1 == steps or now - said > 120:
            say(f"distill  step {step + 1}/{steps}  loss {running / n:.4f}  ({(now - t0) / (step + 1 - first):.2f} s/step)")
            running, n, said = 0.0, 0, now
        if checkpoint and now - saved > checkpoint_s and step + 1 < steps:
            student.eval()
            checkpoint(step + 1)
            student.train()
            saved = time.time()
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
    """Distillation inputs: float RGB [B,3,H,W] x2 in [0,1] at `size`, and their flow [B,2,H,W]
    in px (None for the user's frames).

    frames None: pairs generated by `edgeflow.synth.generate_pair`, a share `natural` of them in
    the natural style; `part` > 0 (the step a resumed run starts at) draws another sequence.
    Otherwise a list of uint8 HxWx3 BGR frames at `size` (read from `origin`,
    named in `description`): random consecutive pairs, each flipped (horizontally, vertically)
    and swapped in order at random. The teacher sees the same pair, so its flow stays the target.
    """

    def __init__(self, frames: list | None, size: tuple[int, int], seed: int = 0, origin=None,
                 natural: float = 0.0, part: int = 0):
        import numpy as np

        self.frames, self.size, self.natural = frames, tuple(size), natural
        self.rng = np.random.default_rng([seed, 0x5EED] if not part else [seed, 0x5EED, part])
        styles = "generated pairs (edgeflow.synth)" if not natural else (
            f"generated pairs (edgeflow.synth), {natural:.0%} natural style")
        self.description = (styles if frames is None else
                            f"{len(frames)} calibration frames from {str(origin)!r}, consecutive pairs, flips and swaps")

    def batch(self, n: int):
        import numpy as np
        import torch

        from edgeflow.training import to_tensor_pair

        pairs = [self._pair() for _ in range(n)]
        tensors = [to_tensor_pair(a, b) for a, b, _ in pairs]
        flow = None if self.frames is not None else torch.from_numpy(
            np.stack([f.transpose(2, 0, 1) for _, _, f in pairs]))
        return torch.cat([a for a, _ in tensors]), torch.cat([b for _, b in tensors]), flow

    def _pair(self):
        from edgeflow.synth import generate_pair

        if self.frames is None:
            style = "natural" if self.rng.random() < self.natural else "chairs"
            return generate_pair(self.rng, self.size, style=style)
        i = int(self.rng.integers(len(self.frames) - 1))
        a, b = self.frames[i], self.frames[i + 1]
        if self.rng.random() < 0.5:
            a, b = b, a
        if self.rng.random() < 0.5:
            a, b = a[:, ::-1], b[:, ::-1]
        if self.rng.random() < 0.5:
            a, b = a[::-1], b[::-1]
        return a, b, None


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
        img1, img2, _ = pairs.batch(batch)
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


def _check_resume(resume, ratio: float, importance: str, round_to: int, steps: int) -> tuple[int, float]:
    """(steps done, seconds spent) of checkpoint `resume`, (0, 0.0) for None; InputError where it
    is not a checkpoint of this pruning short of `steps`."""
    if resume is None:
        return 0, 0.0
    r = getattr(resume, "pruning", None) or {}
    done = (r.get("distillation") or {}).get("steps")
    got = (r.get("ratio"), r.get("importance"), r.get("round_to"))
    if got != (ratio, importance, round_to) or done is None:
        raise InputError(f"resume: expected a checkpoint pruned by {ratio:g} ({importance}, round_to {round_to}), "
                         f"got {'an unpruned net' if not r else 'one pruned by {} ({}, round_to {})'.format(*got)}")
    if not done < steps:
        raise InputError(f"resume: the checkpoint has {done} distillation steps already, expected fewer than {steps}")
    return done, float(r["distillation"].get("seconds", 0.0))


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise MissingDependency("pruning needs torch-pruning; install it with `pip install 'edgeflow[compile]'`") from None
    return torch_pruning
