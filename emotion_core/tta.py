"""Test-time augmentation (TTA): average the softmax of a model over a few views of each image.

One home for TTA, used by ``jobs.train`` (the final evaluation, ``--tta``) and by labelling.
Views are computed on the *normalised* NCHW batch, so out-of-image pixels are 0, the dataset
mean, exactly as in training augmentation:

- ``none``: the image itself (1 forward pass);
- ``flip``: the image and its horizontal mirror (2 passes); faces are left-right symmetric
  enough that the mirror is a second, nearly independent look;
- ``flip+shift``: those two plus the image shifted by ``size // 24`` pixels down-right and the
  mirror shifted up-left (4 passes; 2 px at 48x48, like the training shift);
- ``flip+shift4``: the image and its mirror, each at the centre and shifted by ``size // 24``
  pixels in the four diagonal directions (10 passes; the ten-crop of the FER literature, as shifts).

Each view is a separate forward call (memory stays at one batch; a traced model sees the batch
size it was traced for), and the probabilities are the mean of the views' softmax.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

TTA_MODES = ("none", "flip", "flip+shift", "flip+shift4")


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate an NCHW batch by (dy, dx) pixels; pixels shifted in are 0."""
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w]


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of a normalised NCHW batch that ``mode`` averages over (module doc)."""
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}: use one of {', '.join(TTA_MODES)}")
    views = [x]
    if mode != "none":
        views.append(x.flip(-1))
    s = max(1, x.shape[-1] // 24)
    if mode == "flip+shift":
        views += [shift(x, s, s), shift(x.flip(-1), -s, -s)]
    if mode == "flip+shift4":
        views += [shift(v, dy, dx) for v in (x, views[1]) for dy, dx in ((s, s), (s, -s), (-s, s), (-s, -s))]
    return views


def tta_probs(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """Class probabilities (N, K), float32: the mean softmax of ``forward`` over the views."""
    views = tta_views(x, mode)
    probs = torch.softmax(forward(views[0]).float(), dim=1)
    for v in views[1:]:
        probs += torch.softmax(forward(v).float(), dim=1)
    return probs / len(views) if len(views) > 1 else probs


def tta_cost(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str,
             repeats: int = 5) -> list[float]:
    """Images per second of :func:`tta_probs` on batch ``x``, one figure per repeat (after one
    untimed warm-up call), for measuring what a TTA mode costs against ``none``."""
    rates = []
    with torch.inference_mode():
        tta_probs(forward, x, mode)
        for _ in range(repeats):
            t0 = time.perf_counter()
            tta_probs(forward, x, mode)
            rates.append(len(x) / max(time.perf_counter() - t0, 1e-9))
    return rates
