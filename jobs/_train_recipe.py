"""The training recipe: augmentation, loss, optimizer, learning-rate schedule, precision.

Decisions:
- Augmentation runs vectorised on whole normalised batch tensors on the worker's device: one
  random affine per image (a crop-with-padding style shift, a small rotation, a mild zoom, a
  horizontal flip) in one ``grid_sample``, then brightness/contrast jitter.
- AdamW without weight decay on biases and norms; linear warm-up then cosine decay, as a pure
  function of the step, so a resumed run with a larger ``--epochs`` stretches the rest of the
  schedule.
- Precision: channels_last everywhere (oneDNN's fast path on CPU too: 1.3x measured for EmoNet
  on 2 cores); bf16 autocast on GPUs that support it (fp16 + GradScaler on older ones) and on
  CPUs with native bf16 (AVX512-BF16/AMX: 1.9x measured); fp32 elsewhere. Exported weights are
  fp32 either way.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._train_config import TrainConfig


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    shift: float = 4.0,
    rotate_deg: float = 10.0,
    zoom: float = 0.1,
    hflip: bool = True,
    brightness: float = 0.2,
    contrast: float = 0.2,
    pixel_scale: float = 2.0,
) -> torch.Tensor:
    """Random augmentation of a normalised float batch (N, C, H, W), vectorised.

    ``shift`` is in pixels (like RandomCrop(padding=shift)); out-of-image pixels become 0, the
    dataset mean after normalisation. ``brightness`` is in [0, 1] pixel units and is converted to
    normalised units with ``pixel_scale`` (1 / std)."""
    n, _, h, w = x.shape
    dev = x.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=gen, device=dev) * (hi - lo) + lo

    angle = u(-rotate_deg, rotate_deg) * (math.pi / 180)
    scale = 1.0 / u(1 - zoom, 1 + zoom)
    flip = (
        torch.where(torch.rand(n, generator=gen, device=dev) < 0.5, -1.0, 1.0) if hflip else torch.ones(n, device=dev)
    )
    tx, ty = u(-shift, shift) * (2 / w), u(-shift, shift) * (2 / h)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if contrast or brightness:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        c = u(1 - contrast, 1 + contrast).view(n, 1, 1, 1).to(x.dtype)
        b = (u(-brightness, brightness) * pixel_scale).view(n, 1, 1, 1).to(x.dtype)
        x = (x - mean) * c + mean + b
    return x


# ---------------------------------------------------------------------------------------------
# Schedule, loss, optimizer


def lr_factor(step: int, total_steps: int, warmup_steps: int, floor: float = 0.01) -> float:
    """Linear warm-up to 1, then cosine decay to ``floor`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def class_weights(counts: list[int] | np.ndarray, mode: str) -> list[float] | None:
    """Loss weights from train counts: ``balanced`` = n / (k * count), ``sqrt`` = its square root
    (gentler), normalised to mean 1; ``none`` -> None."""
    if mode == "none":
        return None
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    w = counts.sum() / (len(counts) * counts)
    if mode == "sqrt":
        w = np.sqrt(w)
    elif mode != "balanced":
        raise ValueError(f"unknown class weighting {mode!r}")
    return (w / w.mean()).tolist()


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm parameters (1-d tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, world: int):
    steps = cfg.steps_per_epoch(world)
    total = steps * cfg.epochs
    warmup = min(int(round(cfg.warmup_epochs * steps)), total // 2)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))


def make_criterion(cfg: TrainConfig, device: torch.device) -> nn.Module:
    weight = torch.tensor(cfg.class_weights, dtype=torch.float32, device=device) if cfg.class_weights else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


# ---------------------------------------------------------------------------------------------
# Precision and threads


def _amp_dtype():
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 convolutions run at about twice the fp32 speed (measured 1.9x
    for EmoNet on 2 Zen 4 cores). Without them bf16 is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, use_gpu: bool):
    """Autocast dtype for ``--precision``: ``auto`` is bf16 on GPUs that support it (fp16 on the
    others) and on CPUs with native bf16, else fp32 (None)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if use_gpu:
        return _amp_dtype()
    return torch.bfloat16 if cpu_has_native_bf16() else None


def node_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
