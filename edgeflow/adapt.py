"""Self-supervised adaptation of a flow network to a user's own unlabelled footage.

    result = adapt("flownet2-s", "frames/", "adapted.pt")   # or rtsp://..., file://clip.mp4, v4l2://0
    result.photometric_before, result.photometric_after      # on held-back frames

No ground truth: the network is fine-tuned on consecutive frame pairs (and pairs one frame apart)
of the footage by the photometric error of the second frame warped back by the predicted flow
(census transform, or SSIM + L1), masked where the forward-backward check finds occlusions
(UnFlow), plus an edge-aware second-order smoothness of the flow and a distillation term that
ties the flow to the starting network's (a frozen copy), so the net cannot drift into a
degenerate solution where the photometric loss is weak.

Pseudo-labels (`proposals`): before training, every training pair gets a label flow in both
directions, fused per pixel from the starting network's flow and classical methods' (OpenCV
DIS) by whichever has the lower census distance over a 15x15 window (`label_window`) where the
fused forward and backward labels agree (the same forward-backward check), and the starting
network's flow where they do not (weighing `label_unsure`). FlowNet's multi-scale loss pulls the
network towards them. The photometric loss alone is a weak signal on blurred or hazy footage; a
per-pixel choice between flows by that same distance is a stronger one (MODEL_CARD.md "edgeflow
adapt" has what each gains).

Replay (`replay`): every step also trains on generated pairs with exact flow, the data the
shipped weights learnt from. Without it, the thousands of steps it takes to learn the footage's
scene also unlearn other footage (Middlebury +47 % after 1500 steps on a hazed, blurred clip).

The loss runs at a quarter of the resolution (the resolution of the network's flow; sensor noise
averages out). Random crops, flips and order swaps; a running average of the weights is what
gets written. The last part of the footage (`holdout`) is never trained on: the photometric
error on its pairs, before and after, is the report. Stacks train their last stage only, as in
training.

The frames are read up front (`read_footage`) and every argument is checked before any work
starts; the weights are written atomically at the end, in the edgeflow weight-file format
(fp32) that `create(name, weights=PATH)`, `edgeflow eval --weights` and `edgeflow compile
--weights` load.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeflow.errors import InputError

MIN_FRAMES = 6  # at least 2 held-back frames (one pair) and 4 to adapt on
CENSUS_PATCH = 7
LOSSES = ("census", "ssim")
PROPOSALS = ("dis-medium", "dis-fast", "dis-fine")  # classical flows (`baselines`) fused with the net's into
#                                                    pseudo-labels: one or a comma list, or "none"
FUSE_WINDOW = 15  # px: side of the box the census distances of the candidates are compared over


@dataclass
class AdaptConfig:
    """Knobs of `adapt` (all recorded in the weight file's meta)."""

    steps: int = 5000  # optimiser steps (the run also stops when `seconds` have passed)
    seconds: float | None = None  # wall-clock budget of the optimisation, None: none
    batch: int = 2  # frame pairs per step
    crop: tuple = (256, 320)  # training crop (H, W), multiples of 64; cut down to the frame size
    lr: float = 1e-4  # Adam
    lr_decay: bool = True  # halve the learning rate at 60 %, 80 % and 90 % of the run (of the steps or of
    #                        `seconds`, whichever ends it first), as training does; False: constant
    loss: str = "census"  # photometric term: "census" or "ssim" (0.85 SSIM + 0.15 L1)
    loss_stride: int = 4  # images and flows averaged over 4x4 blocks for the loss: the resolution of the
    #                       net's flow, and sensor noise averaged away (a stride of 2 trained worse)
    photo: float = 1.0  # weight of the photometric term
    smooth: float = 2.0  # weight of the edge-aware second-order smoothness (flow in pixels / DIV_FLOW)
    distill: float = 0.005  # weight of the distillation to the starting network (Charbonnier, pixels)
    proposals: str = "dis-medium,dis-fine"  # classical flows fused with the starting net's into pseudo-labels
    #                                         (comma list of PROPOSALS); "none": no pseudo-labels
    label: float = 1.0  # weight of the pull towards the pseudo-labels (multi-scale EPE, pixels)
    label_window: int = FUSE_WINDOW  # px: side of the box over which the fusion compares the candidates
    label_unsure: float = 1.0  # how much a label pixel counts where the fused labels fail the forward-
    #                            backward check (there the label is the starting net's own flow); 1: as much
    replay: int = 4  # generated pairs with exact flow in each step (the shipped weights' training data,
    #                  `edgeflow.synth` chairs style; multi-scale EPE, each pair weighing as much as one
    #                  direction of a footage pair's labels): what holds the net on other footage; 0: none
    skip: bool = True  # also pairs one frame apart (t, t+2)
    holdout: float = 0.2  # share of the footage (its end) held back for the report
    max_frames: int = 600  # frames read from the source (live sources never end)
    size: tuple | None = None  # network size (H, W) the frames are resized to; None: next multiples of 64
    ema: float = 0.98  # decay of the weight average that is written (about the last 50 steps); 0: none
    seed: int = 0

    def lr_at(self, step: int, elapsed: float) -> float:
        """Adam learning rate of optimiser step `step` (0-based), `elapsed` seconds into the run."""
        from edgeflow.training import step_decay

        if not self.lr_decay:
            return self.lr
        done = step / self.steps if self.seconds is None else max(step / self.steps, elapsed / self.seconds)
        return step_decay(self.lr, done)

    def check(self) -> None:
        """InputError (naming the parameter) for a value `adapt` cannot use."""
        if self.steps < 1:
            raise InputError(f"steps={self.steps}: expected a positive count")
        if self.seconds is not None and not self.seconds > 0:
            raise InputError(f"seconds={self.seconds}: expected a positive time budget or None")
        if self.batch < 1:
            raise InputError(f"batch={self.batch}: expected a positive count")
        for what, hw in (("crop", self.crop), ("size", self.size)):
            if hw is not None and (len(hw) != 2 or any(int(v) <= 0 or int(v) % 64 for v in hw)):
                raise InputError(f"{what}={hw}: expected (H, W), positive multiples of 64")
        if not self.lr > 0:
            raise InputError(f"lr={self.lr}: expected a positive learning rate")
        if self.loss not in LOSSES:
            raise InputError(f"loss={self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.loss_stride not in (1, 2, 4):
            raise InputError(f"loss_stride={self.loss_stride}: expected 1, 2 or 4")
        if min(self.photo, self.smooth, self.distill, self.label) < 0:
            raise InputError(f"photo={self.photo}, smooth={self.smooth}, distill={self.distill}, label={self.label}: "
                             f"weights cannot be negative")
        if self.replay < 0:
            raise InputError(f"replay={self.replay}: expected a count of generated pairs per step (0: none)")
        if self.label_window < 1 or self.label_window % 2 == 0:
            raise InputError(f"label_window={self.label_window}: expected an odd box side in pixels")
        if not 0 <= self.label_unsure <= 1:
            raise InputError(f"label_unsure={self.label_unsure}: expected a weight in [0, 1]")
        names = self.proposals.split(",")
        if self.proposals != "none" and (not set(names) <= set(PROPOSALS) or len(set(names)) < len(names)):
            raise InputError(f"proposals={self.proposals!r}: expected none, or one or more of "
                             f"{', '.join(PROPOSALS)} separated by commas")
        if not 0 < self.holdout < 1:
            raise InputError(f"holdout={self.holdout}: expected a share of the frames between 0 and 1")
        if not 0 <= self.ema < 1:
            raise InputError(f"ema={self.ema}: expected a decay in [0, 1)")
        if self.max_frames < MIN_FRAMES:
            raise InputError(f"max_frames={self.max_frames}: expected at least {MIN_FRAMES}")


@dataclass
class AdaptResult:
    """What `adapt` did: the weight file, the footage split, and the held-back photometric error
    (mean census distance, 0..1, or SSIM + L1 error, over pixels whose flow stays in the image)."""

    path: str
    model: str
    sha256: str
    frames: int
    train_frames: int
    heldout_pairs: int
    size: tuple
    steps: int
    seconds: float
    photometric_before: float
    photometric_after: float
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        change = 100 * (self.photometric_after / self.photometric_before - 1) if self.photometric_before else 0.0
        return (f"{self.path}: {self.model} adapted on {self.train_frames} of {self.frames} frames "
                f"({self.size[0]}x{self.size[1]}), {self.steps} steps in {self.seconds:.0f} s; held-back "
                f"photometric error ({self.config.get('loss', 'census')}, {self.heldout_pairs} pairs) "
                f"{self.photometric_before:.4f} -> {self.photometric_after:.4f} ({change:+.1f} %)")


# ---------------------------------------------------------------------------------------------
# Losses (torch; images float [B,3,H,W] RGB in [0,1], flows [B,2,H,W] in pixels)


def warp(image, flow):
    """Backward bilinear warp: out(x) = image(x + flow(x)) (zeros outside), and the mask [B,1,H,W]
    of the points whose target lies inside the image. torch's grid_sample: the network's own
    FlowWarp (`models.ops.warp`) gives the same values but its gathers train several times slower."""
    import torch
    import torch.nn.functional as F

    _, _, h, w = flow.shape
    ys = torch.arange(h, dtype=flow.dtype, device=flow.device).view(1, h, 1)
    xs = torch.arange(w, dtype=flow.dtype, device=flow.device).view(1, 1, w)
    x2, y2 = xs + flow[:, 0], ys + flow[:, 1]
    inside = ((x2 >= 0) & (y2 >= 0) & (x2 <= w - 1) & (y2 <= h - 1)).unsqueeze(1).to(image.dtype)
    grid = torch.stack((2 * x2 / max(w - 1, 1) - 1, 2 * y2 / max(h - 1, 1) - 1), -1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True), inside


def census_distance(img1, img2, patch: int = CENSUS_PATCH):
    """Per-pixel soft census distance [B,1,H,W] in [0, 1) of img1, img2 [B,3,H,W] RGB in [0,1]
    (UnFlow's ternary census): 0 where the local structure matches. Each image's signature is
    the difference d (0..255 gray scale) of every neighbour in a `patch` x `patch` box (zero
    outside the image) to the centre pixel, as d / sqrt(0.81 + d^2); per neighbour the squared
    difference s of the two signatures counts s / (0.1 + s), averaged over the box.
    One neighbour at a time: a whole [B, patch^2, H, W] signature misses the cache at full
    resolution (3.7 s against 0.39 s for a 384x512 pair on a shared core of the dev machine)."""
    import torch.nn.functional as F

    def gray(img):
        return (0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]) * 255

    g1, g2 = gray(img1), gray(img2)
    (h, w), r = g1.shape[2:], patch // 2
    p1, p2 = F.pad(g1, (r, r, r, r)), F.pad(g2, (r, r, r, r))
    total = 0
    for dy in range(patch):
        for dx in range(patch):
            d1, d2 = p1[..., dy:dy + h, dx:dx + w] - g1, p2[..., dy:dy + h, dx:dx + w] - g2
            s = (d1 / (0.81 + d1 * d1).sqrt() - d2 / (0.81 + d2 * d2).sqrt()) ** 2
            total = total + s / (0.1 + s)
    return total / (patch * patch)


def ssim_l1_distance(img1, img2):
    """Per-pixel 0.85 (1 - SSIM) / 2 + 0.15 |img1 - img2| [B,1,H,W] (3x3 windows, Monodepth)."""
    import torch.nn.functional as F

    pool = lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)  # noqa: E731
    mu1, mu2 = pool(img1), pool(img2)
    s1, s2, s12 = pool(img1 * img1) - mu1 ** 2, pool(img2 * img2) - mu2 ** 2, pool(img1 * img2) - mu1 * mu2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))
    dist = 0.85 * ((1 - ssim) / 2).clamp(0, 1) + 0.15 * (img1 - img2).abs()
    return dist.mean(1, keepdim=True)


def photometric_distance(img1, img2, flow, loss: str = "census"):
    """(distance [B,1,H,W] between img1 and img2 warped back by `flow`, in-image mask [B,1,H,W])."""
    warped, inside = warp(img2, flow)
    dist = census_distance(img1, warped) if loss == "census" else ssim_l1_distance(img1, warped)
    return dist, inside


def occlusion_mask(flow_fw, flow_bw, alpha1: float = 0.01, alpha2: float = 0.5):
    """Forward-backward check (UnFlow): bool [B,1,H,W], True where img1's pixel is occluded in img2
    (or leaves the image): |f + b(x + f)|^2 > alpha1 (|f|^2 + |b(x + f)|^2) + alpha2."""
    b_at, inside = warp(flow_bw, flow_fw)
    sq = ((flow_fw + b_at) ** 2).sum(1, keepdim=True)
    bound = alpha1 * ((flow_fw ** 2).sum(1, keepdim=True) + (b_at ** 2).sum(1, keepdim=True)) + alpha2
    return (sq > bound) | (inside < 0.5)


def smoothness(flow, img, edge: float = 10.0):
    """Edge-aware second-order smoothness of `flow` (pixels / DIV_FLOW): mean |d2 flow| weighted
    by exp(-edge * mean |d img|) along x and y, so flow may bend at image edges only."""
    import torch

    from edgeflow.models.flownet import DIV_FLOW

    f = flow / DIV_FLOW
    total = 0.0
    for dim in (3, 2):
        n = f.shape[dim]
        d2 = f.narrow(dim, 2, n - 2) - 2 * f.narrow(dim, 1, n - 2) + f.narrow(dim, 0, n - 2)
        grad = (img.narrow(dim, 2, n - 2) - img.narrow(dim, 0, n - 2)).abs().mean(1, keepdim=True) / 2
        total = total + (torch.exp(-edge * grad) * d2.abs()).mean()
    return total / 2


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def adapt_loss(flow_fw, flow_bw, teacher_fw, teacher_bw, img1, img2, config: AdaptConfig, pyramid=None,
               labels=None):
    """The self-supervised loss of a batch, both directions: robust photometric distance on
    non-occluded in-image pixels + smoothness + distillation (Charbonnier, pixels) to the teacher
    + with `labels` ([2B,3,H/s,W/s]: the forward then the backward pseudo-labels, in pixels at the
    loss stride s, and the share of each label pixel that passed the forward-backward check)
    FlowNet's multi-scale EPE of the network's `pyramid` (flow2..flow6 of both directions,
    `FlowNet2.pyramids`) against them, normalised to pixels of flow2, the unchecked share of
    each pixel counting `config.label_unsure`.
    Returns (loss, {term: float})."""
    import torch
    import torch.nn.functional as F

    stride = config.loss_stride
    if stride > 1:
        flow_fw, flow_bw, teacher_fw, teacher_bw = (F.avg_pool2d(f, stride) / stride for f in
                                                    (flow_fw, flow_bw, teacher_fw, teacher_bw))
        img1, img2 = F.avg_pool2d(img1, stride), F.avg_pool2d(img2, stride)
    flows, teachers, firsts, seconds = (flow_fw, flow_bw), (teacher_fw, teacher_bw), (img1, img2), (img2, img1)
    photo = smooth = distill = label = 0.0
    for k in range(2):
        with torch.no_grad():
            visible = (~occlusion_mask(flows[k], flows[1 - k])).to(img1.dtype)
        dist, inside = photometric_distance(firsts[k], seconds[k], flows[k], config.loss)
        photo = photo + masked_mean((dist + 0.01) ** 0.4, visible * inside)
        smooth = smooth + smoothness(flows[k] * stride, firsts[k])  # in full-resolution pixels
        distill = distill + _charbonnier((flows[k] - teachers[k]) * stride).mean()
    if labels is not None:  # both directions at once
        checked = labels[:, 2:]
        weight = checked + config.label_unsure * (1 - checked)
        label = 2 * supervised_loss(pyramid, labels[:, :2] * stride, weight)
    loss = config.photo * photo + config.smooth * smooth + config.distill * distill + config.label * label
    terms = {"photo": photo, "smooth": smooth, "distill": distill} | ({"label": label} if labels is not None else {})
    return loss, {k: float(v.detach()) / 2 for k, v in terms.items()}


def supervised_loss(pyramid, flow, weight=None):
    """FlowNet's multi-scale loss (`training.multiscale_loss`) of the pyramid [flow2..flow6] against
    `flow` [B,2,H,W] (pixels), each pixel counting `weight` ([B,1,H,W] in [0, 1], None: 1),
    normalised to the mean EPE in pixels of flow2 per pair."""
    from edgeflow.models.flownet import DIV_FLOW
    from edgeflow.training import LOSS_WEIGHTS, multiscale_loss

    flow2 = pyramid[0]
    return multiscale_loss(pyramid, flow, weight) * DIV_FLOW / (LOSS_WEIGHTS[0] * flow2.shape[2] * flow2.shape[3])


def _charbonnier(diff):
    """[B,1,H,W] robust length sqrt(|diff|^2 + 0.01) of a flow difference [B,2,H,W] (pixels)."""
    import torch

    return torch.sqrt((diff ** 2).sum(1, keepdim=True) + 1e-2)


# ---------------------------------------------------------------------------------------------
# Pseudo-labels


def fuse(img1, img2, candidates, window: int = FUSE_WINDOW):
    """Per pixel, the candidate flow whose census distance (img2 warped back to img1) summed over a
    `window` x `window` box is lowest. img1, img2 [1,3,H,W] RGB in [0,1]; candidates: flows
    [1,2,H,W] in pixels. Returns the fused flow [1,2,H,W]."""
    import torch
    import torch.nn.functional as F

    scores = []
    for flow in candidates:
        dist, inside = photometric_distance(img1, img2, flow, "census")
        dist = torch.where(inside > 0.5, dist, torch.ones_like(dist))  # leaving the image: no evidence
        scores.append(F.avg_pool2d(dist, window, 1, window // 2, count_include_pad=False))
    best = torch.stack(scores).argmin(0)  # [1,1,H,W]
    return torch.gather(torch.stack(candidates), 0, best.expand(1, 2, -1, -1).unsqueeze(0))[0]


def pseudo_labels(net, frames: list, gaps: tuple, proposals: str, stride: int, window: int = FUSE_WINDOW,
                  progress: bool = False) -> dict:
    """Pseudo-labels of the pairs (t, t + gap) of `frames` (uint8 BGR at the network size):
    {(t, gap): [2,3,H/s,W/s] float32, forward then backward: the flow in pixels at stride s =
    `stride`, then the share of the pixel that passed the forward-backward check (0..1)}.
    Each direction fuses (`fuse`, over `window` px boxes) the starting network `net`'s flow with
    those of the classical methods `proposals` (a comma list of PROPOSALS) where the fused flows
    pass the forward-backward check, and keeps the network's flow where they do not."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from edgeflow.baselines import baseline
    from edgeflow.training import to_tensor_pair

    classical = [baseline(name) for name in proposals.split(",")]
    keys = [(t, g) for g in gaps for t in range(len(frames) - g)]
    out = {}
    with torch.no_grad():
        for t, g in tqdm(keys, desc="pseudo-labels", disable=not progress, dynamic_ncols=True):
            a, b = frames[t], frames[t + g]
            x1, x2 = to_tensor_pair(a, b)
            net_fw, net_bw = net(torch.cat((x1, x2)), torch.cat((x2, x1))).chunk(2)
            other_fw, other_bw = ([torch.from_numpy(flow(p, q).transpose(2, 0, 1).copy())[None] for flow in classical]
                                  for p, q in ((a, b), (b, a)))
            fw, bw = fuse(x1, x2, [net_fw, *other_fw], window), fuse(x2, x1, [net_bw, *other_bw], window)
            valid = torch.cat([~occlusion_mask(fw, bw), ~occlusion_mask(bw, fw)])
            flows = torch.where(valid, torch.cat((fw, bw)), torch.cat((net_fw, net_bw)))
            labels = torch.cat((flows, valid.to(flows.dtype)), 1)
            if stride > 1:
                labels = F.avg_pool2d(labels, stride) * torch.tensor([1 / stride, 1 / stride, 1]).view(1, 3, 1, 1)
            out[(t, g)] = labels.numpy()
    return out


# ---------------------------------------------------------------------------------------------
# Footage


def read_footage(frames, *, max_frames: int = 600, size: tuple | None = None) -> tuple[list, tuple]:
    """Read up to `max_frames` frames of `frames` (a directory or glob of images, a video file or a
    source URI: `edgeflow.runtime.open_source`) and resize them to the network size: `size` or
    the frames' own size rounded up to multiples of 64. Returns (uint8 BGR frames, (H, W)).
    InputError for a source that cannot be opened or read, frames of different sizes, or fewer
    than MIN_FRAMES frames."""
    from edgeflow.runtime.preprocess import resize
    from edgeflow.runtime.sources import open_source

    where = f"frames={str(frames)!r}"
    try:
        source = open_source(frames)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    out, first = [], None
    with source:
        for img in source:
            if img.ndim != 3 or img.shape[2] != 3:
                raise InputError(f"{where}: frame {len(out)} has shape {img.shape}; expected HxWx3 BGR")
            if first is None:
                first = img.shape[:2]
                if (img == img[:1, :1]).all():
                    raise InputError(f"{where}: the first frame is all one colour; it shows no scene to adapt to")
                size = tuple(size) if size else tuple(-(-v // 64) * 64 for v in first)
            elif img.shape[:2] != first:
                raise InputError(f"{where}: frame {len(out)} is {img.shape[1]}x{img.shape[0]}, "
                                 f"the first is {first[1]}x{first[0]}; expected one camera's frames")
            out.append(np.ascontiguousarray(resize(img, *size)))
            if len(out) >= max_frames:
                break
    if len(out) < MIN_FRAMES:
        raise InputError(f"{where}: {len(out)} frame{'s' * (len(out) != 1)} read; adapt needs at least "
                         f"{MIN_FRAMES} consecutive frames of one camera")
    return out, tuple(int(v) for v in size)


def split_footage(count: int, holdout: float) -> int:
    """How many leading frames adapt trains on; the rest (at least 2 frames) are held back."""
    train = int(round(count * (1 - holdout)))
    return max(2, min(train, count - 2))


class _Pairs:
    """Random training pairs of the leading frames: (t, t+1), and (t, t+2) with `skip`, cropped
    (at multiples of the loss stride, so that the pseudo-labels stay aligned), flipped and swapped
    in order at random; with `labels` (`pseudo_labels`) their label crops follow."""

    def __init__(self, frames: list, crop: tuple, gaps: tuple, rng: np.random.Generator, stride: int,
                 labels: dict | None = None):
        self.frames, self.rng, self.gaps, self.stride, self.labels = frames, rng, gaps, stride, labels
        h, w = frames[0].shape[:2]
        self.crop = (min(crop[0], h), min(crop[1], w))

    def batch(self, n: int):
        """(img1, img2 [n,3,h,w] RGB in [0,1], labels: None or [2n,3,h/s,w/s], the forward labels
        of the n pairs then their backward ones, as `pseudo_labels` gives them)."""
        import torch

        from edgeflow.training import to_tensor_pair

        items = [self._pair() for _ in range(n)]
        pairs = [to_tensor_pair(a, b) for a, b, _ in items]
        img1, img2 = torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])
        if self.labels is None:
            return img1, img2, None
        flows = torch.from_numpy(np.stack([f for _, _, f in items]))  # [n, 2 directions, 3, h/s, w/s]
        return img1, img2, torch.cat((flows[:, 0], flows[:, 1]))

    def _pair(self):
        rng, s = self.rng, self.stride
        gap = self.gaps[int(rng.integers(len(self.gaps)))]
        t = int(rng.integers(len(self.frames) - gap))
        a, b = self.frames[t], self.frames[t + gap]
        (h, w), (ch, cw) = a.shape[:2], self.crop
        y, x = s * int(rng.integers((h - ch) // s + 1)), s * int(rng.integers((w - cw) // s + 1))
        a, b = a[y:y + ch, x:x + cw], b[y:y + ch, x:x + cw]
        flows = None if self.labels is None else \
            self.labels[(t, gap)][:, :, y // s:(y + ch) // s, x // s:(x + cw) // s]
        if rng.random() < 0.5:  # the pair in the other order: the backward label becomes the forward one
            a, b = b, a
            flows = None if flows is None else flows[::-1]
        if rng.random() < 0.5:
            a, b = a[:, ::-1], b[:, ::-1]
            flows = None if flows is None else flows[..., ::-1] * np.float32([-1, 1, 1])[:, None, None]
        if rng.random() < 0.5:
            a, b = a[::-1], b[::-1]
            flows = None if flows is None else flows[..., ::-1, :] * np.float32([1, -1, 1])[:, None, None]
        return (np.ascontiguousarray(a), np.ascontiguousarray(b),
                None if flows is None else np.ascontiguousarray(flows))


class _Replay:
    """Generated pairs with exact flow, as the shipped weights were trained on (`training.PairStream`,
    chairs style, rendered at training's scene size and cropped), drawn from a seed of their own."""

    SEED = 10_000_000  # + the adapt seed: disjoint from training's and the held-out set's draws

    def __init__(self, crop: tuple, seed: int):
        from edgeflow.training import PairStream, TrainConfig

        scene = TrainConfig.scene
        self.stream = iter(PairStream(self.SEED + seed, [min(c, s) for c, s in zip(crop, scene)], scene))

    def batch(self, n: int):
        """(img1, img2 [n,3,h,w] RGB in [0,1], flow [n,2,h,w] in pixels)."""
        import torch

        return tuple(torch.stack(t) for t in zip(*(next(self.stream) for _ in range(n))))


def heldout_error(model, frames: list, loss: str = "census") -> float:
    """Mean photometric distance of consecutive pairs of `frames` (at the network size) warped by
    `model`'s flow, over the pixels whose flow stays in the image (no occlusion mask, so that a
    network cannot lower it by declaring pixels occluded)."""
    import torch

    from edgeflow.training import to_tensor_pair

    errs = []
    with torch.no_grad():
        for a, b in zip(frames[:-1], frames[1:]):
            x1, x2 = to_tensor_pair(a, b)
            dist, inside = photometric_distance(x1, x2, model(x1, x2), loss)
            errs.append(float(masked_mean(dist, inside)))
    return float(np.mean(errs))


# ---------------------------------------------------------------------------------------------
# The run


def adapt(model: str, frames, out: str | os.PathLike, *, weights="default", config: AdaptConfig | None = None,
          progress: bool = True, **knobs) -> AdaptResult:
    """Fine-tune registry model `model` (starting from `weights`: "default" or a weight file) on the
    unlabelled footage `frames` (see `read_footage`) and write the adapted weights to `out`.

    `config` (or keyword knobs of `AdaptConfig`, e.g. steps=200, seconds=600) sets the run. Every
    argument and the footage are checked first; nothing is written unless the run completes.
    A progress bar goes to stderr when `progress`. Returns an `AdaptResult`.
    """
    import copy

    import torch
    from tqdm import tqdm

    from edgeflow.models import CAFFE_MEAN_KEY, PRUNING_KEY, create, spec
    from edgeflow.models import weights as wio
    from edgeflow.models.channels import META_KEY
    from edgeflow.models.flownet import DIV_FLOW
    from edgeflow.models.stack import upsample_flow
    from edgeflow.training import ema_ramp

    config = config or AdaptConfig()
    for key, value in knobs.items():
        if not hasattr(config, key):
            raise InputError(f"unknown adapt parameter {key}=; choices: {', '.join(sorted(asdict(config)))}")
        config = _replace(config, key, value)
    config.check()
    stages = spec(model).stages
    out = Path(out)
    if out.is_dir():
        raise InputError(f"out={str(out)!r} is a directory; expected a weight file path, e.g. adapted.pt")
    if not out.parent.is_dir():
        raise InputError(f"out={str(out)!r}: directory {str(out.parent)!r} does not exist")
    source_meta = wio.read(wio.resolve(model, weights)).get("meta", {})
    net = create(model, weights=weights)
    footage, size = read_footage(frames, max_frames=config.max_frames, size=config.size)
    n_train = split_footage(len(footage), config.holdout)
    train, held = footage[:n_train], footage[n_train:]

    torch.manual_seed(config.seed)
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    train_from = len(stages) - 1
    for i, name in enumerate(net.names):
        getattr(net, name).requires_grad_(i >= train_from)
    trained = [name for name, p in net.named_parameters() if p.requires_grad]
    params = [dict(net.named_parameters())[n] for n in trained]
    average = copy.deepcopy(net).eval().requires_grad_(False)
    averaged = [dict(average.named_parameters())[n] for n in trained]
    before = heldout_error(net, held, config.loss)
    opt = torch.optim.Adam(params, lr=config.lr)
    gaps = (1, 2) if config.skip and len(train) > 2 else (1,)
    labels = None if config.proposals == "none" or config.label == 0 else \
        pseudo_labels(teacher, train, gaps, config.proposals, config.loss_stride, config.label_window, progress)
    pairs = _Pairs(train, config.crop, gaps, np.random.default_rng([config.seed, 0xADA]), config.loss_stride, labels)
    replay = _Replay(config.crop, config.seed) if config.replay else None
    net.train()
    t0, step = time.monotonic(), 0
    bar = tqdm(total=config.steps, disable=not progress, unit="step", dynamic_ncols=True)
    with bar:
        while step < config.steps and (config.seconds is None or time.monotonic() - t0 < config.seconds):
            for g in opt.param_groups:
                g["lr"] = config.lr_at(step, time.monotonic() - t0)
            img1, img2, batch_labels = pairs.batch(config.batch)
            both1, both2 = torch.cat((img1, img2)), torch.cat((img2, img1))
            with torch.no_grad():
                t_fw, t_bw = teacher(both1, both2).chunk(2)
            pyramid = net.pyramids(both1, both2, train_from=train_from)
            s_fw, s_bw = upsample_flow(pyramid[0] * DIV_FLOW, 4).chunk(2)  # what net(both1, both2) returns
            loss, terms = adapt_loss(s_fw, s_bw, t_fw, t_bw, img1, img2, config, pyramid, batch_labels)
            if replay is not None:
                r1, r2, r_flow = replay.batch(config.replay)
                kept = supervised_loss(net.pyramids(r1, r2, train_from=train_from), r_flow)
                kept = kept * config.replay / config.batch  # each pair weighs as one direction of a footage pair
                loss, terms["replay"] = loss + kept, float(kept.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            torch._foreach_lerp_(averaged, params, 1 - ema_ramp(config.ema, step))
            step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()})
    seconds = time.monotonic() - t0
    net = average  # what is measured and written: the weight average
    after = heldout_error(net, held, config.loss)
    record = {"from": str(weights), "frames": str(frames), "steps": step, "seconds": round(seconds, 1),
              "photometric_before": before, "photometric_after": after, "config": asdict(config)}
    meta = {k: source_meta[k] for k in (CAFFE_MEAN_KEY, PRUNING_KEY, META_KEY) if k in source_meta}
    sha = wio.save(net, model, out, meta={**meta, "adapt": record}, half=False)
    return AdaptResult(path=str(out), model=model, sha256=sha, frames=len(footage), train_frames=n_train,
                       heldout_pairs=len(held) - 1, size=size, steps=step, seconds=seconds,
                       photometric_before=before, photometric_after=after, config=asdict(config))


def _replace(config: AdaptConfig, key: str, value) -> AdaptConfig:
    from dataclasses import replace

    if key in ("crop", "size") and value is not None:
        value = tuple(int(v) for v in value)
    return replace(config, **{key: value})
