"""Training FlowNet2 models on synthetic pairs generated on the fly, on the CPU.

Recipe (measured in MODEL_CARD.md): He initialisation, Adam at 4e-4 halved at 60/80/90 % of the
steps, FlowNet's multi-scale EPE loss on flow6..flow2 with weights 0.32/0.08/0.02/0.01/0.005 and
the target scaled by 1/20, a curriculum of crop sizes cut from pairs rendered at the held-out
size (the synthetic displacements scale with the render width, so rendering at the crop size
would never show the net the held-out set's largest motions), flips and photometric
augmentation, and an exponential moving average of the weights (decay 0.999), which is what gets
evaluated and shipped. For a stack, the earlier stages are loaded from the shipped weights of
the smaller model and frozen.
Checkpoints (`ckpt.pt`) are written atomically and resumed; `log.jsonl` holds the curve.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgeflow.models.flownet import DIV_FLOW

LOSS_WEIGHTS = (0.005, 0.01, 0.02, 0.08, 0.32)  # flow2 .. flow6


@dataclass
class TrainConfig:
    """Everything that determines a training run (written to the checkpoint and the log)."""

    model: str = "flownet2-s"
    steps: int = 30000
    batch: int = 8
    lr: float = 4e-4
    weight_decay: float = 0.0  # coupled L2 in Adam; 4e-4 held the net at zero flow (MODEL_CARD.md)
    # (first step, H, W): crop size from that step on
    curriculum: list = field(default_factory=lambda: [[0, 256, 320], [20000, 320, 448]])
    scene: tuple = (384, 512)  # render size (H, W) of a training pair; crops are cut from it
    seed: int = 0
    workers: int = 1
    eval_every: int = 1000
    heldout_pairs: int = 64
    heldout_size: tuple = (384, 512)
    init_from: str | None = "default"  # weights of the frozen earlier stages of a stack
    init: str | None = None  # weights of the whole model at step 0 ("default": the shipped ones), to fine-tune
    natural: float = 0.0  # fraction of training pairs drawn in the natural style (edgeflow.synth_natural)
    natural_without: tuple = ()  # natural-style ingredients left out of the training pairs (synth_natural.INGREDIENTS)
    device: str = "cpu"  # torch device of the model: "cpu" or "cuda"
    bf16: bool = False  # forward and backward under bfloat16 autocast (weights, optimiser and loss in fp32)
    ema: float = 0.999  # per-step decay of the weight average that is evaluated and shipped

    def __post_init__(self):
        from edgeflow.errors import InputError

        for start, h, w in self.curriculum:
            if h > self.scene[0] or w > self.scene[1]:
                raise InputError(f"training crop {h}x{w} (curriculum, from step {start}) does not fit in the "
                                 f"{self.scene[0]}x{self.scene[1]} scene it is cut from (scene=)")

    def size_at(self, step: int) -> tuple[int, int]:
        size = self.curriculum[0][1:]
        for start, h, w in self.curriculum:
            if step >= start:
                size = (h, w)
        return tuple(size)

    def lr_at(self, step: int) -> float:
        """Adam learning rate of step `step` (`step_decay`)."""
        return step_decay(self.lr, step / self.steps)

    def ema_at(self, step: int) -> float:
        """Decay of the weight average after step `step` (`ema_ramp`)."""
        return ema_ramp(self.ema, step)


def step_decay(lr: float, done: float) -> float:
    """Adam learning rate once the share `done` (0..1) of a run is done: `lr`, halved at 60 %, 80 %
    and 90 %."""
    return lr * 0.5 ** sum(done >= f for f in (0.6, 0.8, 0.9))


def ema_ramp(ema: float, step: int) -> float:
    """Decay of a weight average after optimiser step `step` (0-based): `ema`, ramped up from 0.1
    so the first steps do not hold the average at the initialisation."""
    return min(ema, (1 + step) / (10 + step))


def heldout_set(count: int, size: tuple[int, int], seed: int = 987654, style: str = "chairs"):
    """The held-out synthetic pairs: the same as `edgeflow synth DIR --count COUNT --size HxW
    --seed SEED --style STYLE` writes (pair i from `default_rng([seed, i])`, i = 1..count).
    Training draws from `[seed * 1000 + step, worker]` with seed * 1000 + step < 987654, so the
    sets are disjoint."""
    from edgeflow.synth import generate_pair

    return [generate_pair(np.random.default_rng([seed, i]), size, style=style) for i in range(1, count + 1)]


def to_tensor_pair(img1: np.ndarray, img2: np.ndarray):
    """BGR uint8 HxWx3 x2 -> float RGB [1,3,H,W] x2 in [0,1] (`runtime.preprocess.to_input`)."""
    from edgeflow.runtime.preprocess import to_input

    return torch.from_numpy(to_input(img1)), torch.from_numpy(to_input(img2))


def augment(img1, img2, flow, rng: np.random.Generator):
    """Random flips (flow signs follow) and a random colour-channel order; numpy HxWxC."""
    if rng.random() < 0.5:
        img1, img2, flow = img1[:, ::-1], img2[:, ::-1], flow[:, ::-1] * np.float32([-1, 1])
    if rng.random() < 0.5:
        img1, img2, flow = img1[::-1], img2[::-1], flow[::-1] * np.float32([1, -1])
    perm = rng.permutation(3)
    return img1[:, :, perm], img2[:, :, perm], flow


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float()


class PairStream(torch.utils.data.IterableDataset):
    """An endless stream of augmented synthetic pairs, seeded per worker.

    Pairs are rendered at `scene` (H, W), a fraction `natural` of them in the natural style
    without the ingredients `without`, and a random crop is cut from each. Items are
    (img1 [3,H,W] float RGB in [0,1], img2, flow [2,H,W] in pixels). The crop size (H, W) is
    read from `size_value`, a shared array the trainer moves along the curriculum.
    """

    def __init__(self, seed: int, size_value, scene: tuple[int, int], natural: float = 0.0, without=()):
        self.seed = seed
        self.size_value = size_value
        self.scene = tuple(scene)
        self.natural = natural
        self.without = tuple(without)

    def __iter__(self):
        import cv2

        from edgeflow.synth import generate_pair

        cv2.setNumThreads(1)  # one generator per worker process
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info is not None else 0])
        while True:
            h, w = self.size_value[:]
            natural = self.natural and rng.random() < self.natural
            img1, img2, flow = generate_pair(rng, self.scene, style="natural" if natural else "chairs",
                                             without=self.without if natural else ())
            y = int(rng.integers(0, self.scene[0] - h + 1))
            x = int(rng.integers(0, self.scene[1] - w + 1))
            crop = np.s_[y:y + h, x:x + w]
            img1, img2, flow = augment(img1[crop], img2[crop], flow[crop], rng)
            a, b = to_tensor_pair(np.ascontiguousarray(img1), np.ascontiguousarray(img2))
            yield a[0], b[0], _chw(flow)


def multiscale_loss(pyramid, flow, weight=None):
    """FlowNet's loss: sum over levels of weight x EPE(flowK, pooled target / 20) summed over the
    level's pixels, per pair (Caffe's loss layers divide by the batch only).

    Summing over pixels makes flow2 (16x the pixels of flow4) weigh the most; a per-level mean
    would let flow6 weigh 64x flow2, and the fine levels, where matching is learnt first, barely
    move (MODEL_CARD.md). pyramid: [flow2..flow6], each [B,2,H/2^K,W/2^K]; flow: [B,2,H,W] in px;
    weight: None or [B,1,H,W] in [0, 1], how much each target pixel counts (its level's target is
    then the weighted mean of the pixels it pools, and each level's pixel weighs their mean weight).
    """
    import torch.nn.functional as F

    target = flow / DIV_FLOW
    total = 0.0
    for level_weight, pred in zip(LOSS_WEIGHTS, pyramid):
        factor = target.shape[2] // pred.shape[2]
        if weight is None:
            err = torch.norm(pred - F.avg_pool2d(target, factor, factor), p=2, dim=1)
        else:
            w = F.avg_pool2d(weight, factor, factor)
            t = F.avg_pool2d(target * weight, factor, factor) / w.clamp(min=1e-6)
            err = w[:, 0] * torch.norm(pred - t, p=2, dim=1)
        total = total + level_weight * err.sum() / pred.shape[0]
    return total


def evaluate_pairs(model, pairs) -> float:
    """Mean EPE (pixels) of `model` on a list of (img1, img2, flow) numpy pairs, on the model's device."""
    from edgeflow.metrics import epe

    device = next(model.parameters()).device
    errs = []
    with torch.no_grad():
        for img1, img2, flow in pairs:
            a, b = (t.to(device) for t in to_tensor_pair(img1, img2))
            pred = model(a, b)[0].float().permute(1, 2, 0).cpu().numpy()
            errs.append(epe(pred, flow))
    return float(np.mean(errs))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(config: TrainConfig, out_dir: str | os.PathLike, *, progress: bool = True, budget_s: float | None = None,
          checkpoint_s: float | None = None) -> dict:
    """Train `config.model`, resuming from `out_dir/ckpt.pt` if it exists; returns the last log row.

    `budget_s` stops the run after that many seconds of wall-clock time, with a checkpoint (the
    run resumes from it later); `checkpoint_s` also writes the checkpoint that often between
    evaluations, so that a run cut off from outside loses at most that much.

    Writes out_dir/ckpt.pt (model, weight average, optimiser, step, config), out_dir/log.jsonl
    (one JSON row per evaluation: step, loss, lr, pairs_per_s, heldout_epe; heldout_natural_epe with --natural) and out_dir/best.pt
    (an edgeflow weight file of the best held-out EPE so far). Evaluation, best.pt and the returned row are
    of the weight average (`config.ema`), not of the weights the optimiser last left.
    """
    import contextlib
    import copy
    import multiprocessing as mp

    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from edgeflow.models import create, spec
    from edgeflow.models import weights as wio

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    started = time.time()
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = create(config.model, weights=config.init)
    stages = spec(config.model).stages
    train_from = len(stages) - 1
    if train_from and config.init_from and not config.init:
        _init_frozen_stages(model, stages, config.init_from)
    if train_from and not config.init:
        start_from_previous_stage(model)
    for i, name in enumerate(model.names):
        getattr(model, name).requires_grad_(i >= train_from)
    model.to(device)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(trained.values())
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    step, best = 0, math.inf
    ck = wio.load_tensors(ckpt_path, "training checkpoint") if ckpt_path.exists() else {}
    if ck:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, best = ck["step"], ck["best"]
    average = copy.deepcopy(model).eval().requires_grad_(False)
    if "ema" in ck:  # a checkpoint from before the average starts it at its weights
        average.load_state_dict(ck["ema"])
    averaged = [dict(average.named_parameters())[n] for n in trained]
    heldout = heldout_set(config.heldout_pairs, config.heldout_size)
    heldout_natural = heldout_set(config.heldout_pairs, config.heldout_size, style="natural") if config.natural else []
    size_value = mp.get_context("spawn").Array("i", config.size_at(step), lock=False)
    loader = DataLoader(PairStream(config.seed * 1000 + step, size_value, config.scene, config.natural,
                                   config.natural_without),
                        batch_size=config.batch,
                        num_workers=config.workers, persistent_workers=config.workers > 0,
                        prefetch_factor=4 if config.workers else None,
                        # OpenCV's thread pool does not survive fork: start workers fresh
                        multiprocessing_context="spawn" if config.workers else None,
                        pin_memory=device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if config.bf16 else contextlib.nullcontext

    def save_checkpoint():
        _atomic_save({"model": model.state_dict(), "ema": average.state_dict(), "optimizer": opt.state_dict(),
                      "step": step, "best": best, "config": asdict(config)}, ckpt_path)
        return time.time(), step

    bar = tqdm(total=config.steps, initial=step, disable=not progress, dynamic_ncols=True)
    it = iter(loader)
    t0, pairs, last = time.time(), 0, {}
    saved, saved_step = t0, step  # when and at which step the checkpoint was last written
    model.train()
    while step < config.steps:
        size_value[:] = config.size_at(step)
        img1, img2, flow = (t.to(device, non_blocking=True) for t in next(it))
        if tuple(img1.shape[2:]) != tuple(size_value[:]):
            continue  # batch from before a curriculum change
        for g in opt.param_groups:
            g["lr"] = config.lr_at(step)
        with autocast():
            pyramid = model.pyramids(img1, img2, train_from=train_from)
        loss = multiscale_loss([p.float() for p in pyramid], flow)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch._foreach_lerp_(averaged, params, 1 - config.ema_at(step))
        step += 1
        pairs += img1.shape[0]
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", size="x".join(map(str, size_value[:])))
        if step % config.eval_every == 0 or step == config.steps:
            rate = pairs / (time.time() - t0)
            err = evaluate_pairs(average, heldout)
            last = {"step": step, "loss": round(loss.item(), 4), "lr": config.lr_at(step - 1),
                    "size": list(size_value[:]), "pairs_per_s": round(rate, 2), "heldout_epe": round(err, 4)}
            if heldout_natural:  # choose on both styles' held-out sets
                natural_err = evaluate_pairs(average, heldout_natural)
                last["heldout_natural_epe"] = round(natural_err, 4)
                err = (err + natural_err) / 2
            last["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.write(json.dumps(last))
            if err < best:
                best = err
                wio.save(average, config.model, out / "best.pt",
                         meta={"step": step, "heldout_epe": last["heldout_epe"], "selection_epe": err,
                               "config": asdict(config)})
            saved, saved_step = save_checkpoint()
            t0, pairs = time.time(), 0
        out_of_time = budget_s is not None and time.time() - started >= budget_s
        due = checkpoint_s is not None and time.time() - saved >= checkpoint_s
        if (due or out_of_time) and saved_step != step:
            saved, saved_step = save_checkpoint()
        if out_of_time:
            bar.write(f"stopped at step {step}: the {budget_s:.0f} s budget is spent (resume with the same command)")
            break
    bar.close()
    return last


def start_from_previous_stage(model) -> bool:
    """Make the last stage of a stack a copy of the stage before it when that is a FlowNetS, so
    the stack starts at the smaller model's flow and training only has to improve on it.

    conv1 weights of the input channels the previous stage lacks (for a second stage: the warped
    image, the flow and the brightness error) start at zero. Returns False, keeping the He
    initialisation, when the previous stage is a FlowNetC.
    """
    from edgeflow.models.flownet import FlowNetS

    prev, last = (getattr(model, name) for name in model.names[-2:])
    if not isinstance(prev, FlowNetS):
        return False
    state = prev.state_dict()
    w = state["conv1.0.weight"]
    conv1 = torch.zeros_like(last.conv1[0].weight)
    conv1[:, :w.shape[1]] = w
    state["conv1.0.weight"] = conv1
    last.load_state_dict(state)
    return True


def _init_frozen_stages(model, stages: str, init_from) -> None:
    """Load the stages before the last one from the weights of the model they form.

    For 'ss' the first stage comes from flownet2-s's weights; for 'css' the first two come
    from flownet2-cs's, and so on.
    """
    from edgeflow.models import create
    from edgeflow.models.registry import SPECS

    prefix = stages[:-1]
    donor_name = next(s.name for s in SPECS.values() if s.stages == prefix and s.width == model.width)
    donor = create(donor_name, weights=init_from)
    for name in donor.names:
        getattr(model, name).load_state_dict(getattr(donor, name).state_dict())
