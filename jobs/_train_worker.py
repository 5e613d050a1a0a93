"""What runs inside each Ray Train worker: ``train_func`` over ``train_one_epoch`` and ``evaluate``.

The shape of torchvision's ``references/classification/train.py``; the Ray touch points are
``ray.train.get_context``, ``prepare_model``, ``get_checkpoint``, ``get_dataset_shard`` and
``report``.

- Data arrives as decoded uint8 pixels from Ray Data; normalisation and augmentation run on whole
  batch tensors on the worker's device (:mod:`jobs._train_recipe`).
- ``--batch-size`` is global: each of W workers takes ``batch // W``, so results do not depend on
  the worker count. Torch threads per worker = node CPUs // local workers.
- Validation: every worker reads the whole (small) validation set but scores only rows with
  ``idx % world == rank``; the confusion matrices are summed with ``all_reduce``, so metrics are
  exact, with no rows dropped by an equal split.
- ``--time-budget``: the first epoch this process runs (train + validation, wall-clock; the
  slowest worker's) is the measurement; after it the epoch count is set to what fits in the
  budget (at most ``--epochs``, :func:`jobs._train_recipe.plan_epochs`), the cosine schedule is
  stretched or shrunk to end there, and the decision is stored in the run's progress, so a
  resumed run keeps it (with another budget or cap it is re-planned from the stored s/epoch,
  :func:`planned_epochs`). The budget counts the training loop only: Ray start-up, data
  decoding and the final evaluation and export are outside it. The first epoch is the slowest
  (data pipeline and kernel start-up: 1.3-1.6x a later one on FER2013), so while the cosine is
  in its first half the length is corrected after every epoch from the steady epoch time, which
  includes the checkpoint write (:func:`replan`). Whole epochs, not "the first part" of one: each
  epoch restarts the data iterators, so the first steps' start-up recurs every epoch and a
  steady-rate estimate overran a 6 s budget by 2-4x.
- With ``--ema`` the per-epoch validation, the best checkpoint and the exported model use the
  averaged weights.
- Rank 0 prints a progress line within each epoch every 15 s (a text bar, images/s, the epoch's
  ETA) and one summary line per epoch: plain lines, so they read the same in a terminal, in
  ``ray job logs`` and in CI logs (a redrawn bar does not survive Ray's log forwarding).
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from emotion_core.preprocess import normalize
from emotion_core.tta import tta_probs

from . import _train_state
from ._train_config import TrainConfig
from ._train_recipe import (
    ModelEma,
    augment,
    make_criterion,
    make_optimizer,
    make_scheduler,
    mix_batch,
    node_cpus,
    plan_epochs,
    random_erasing,
    replan_epochs,
    resolve_precision,
)

BATCH_DTYPES = {"image": torch.uint8, "label": torch.int64, "idx": torch.int64}


def train_func(config: dict) -> None:
    """The Ray Train worker: data -> model -> optimizer -> schedule -> resume -> epochs."""
    import ray.train
    import ray.train.torch

    from emotion_core import metrics as M

    cfg = TrainConfig.from_dict(config)
    quiet_ray_data()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, node_cpus() // max(1, ctx.get_local_world_size())))
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)

    model = cfg.create_model(init_weights=cfg.init_weights)
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, world)
    criterion = make_criterion(cfg, device)
    amp_dtype = resolve_precision(cfg.precision, cfg.use_gpu)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    ema = ModelEma(model, cfg.ema) if cfg.ema > 0 else None

    progress = _train_state.RunProgress()
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        progress = _train_state.restore(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                                        log=log_line if rank == 0 else _silent)
        if rank == 0:
            log_line(f"[train] resumed from checkpoint at epoch {progress.epoch}")
    epochs = planned_epochs(cfg, progress)
    scheduler.lr_lambdas[0].set_epochs(epochs)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    run_start, elapsed_before, epochs_run = time.perf_counter(), progress.elapsed_s, 0
    epoch, iteration_ends = progress.epoch, []
    while epoch < epochs and not progress.should_stop(cfg.patience):
        if cfg.time_budget_min and progress.budget and len(iteration_ends) >= 2 and epoch <= epochs // 2:
            epochs = replan(cfg, progress, epoch, epochs, elapsed_before + time.perf_counter() - run_start,
                            iteration_ends, world, device, rank)
            scheduler.lr_lambdas[0].set_epochs(epochs)
        epoch += 1
        epoch_start = time.perf_counter()
        train_loss, train_acc, seen, seconds = train_one_epoch(
            model, criterion, optimizer, scheduler, scaler, train_shard, cfg, epoch, epochs, device, amp_dtype,
            rank, world, ema
        )
        cm, val_loss = evaluate(ema.module if ema else model,
                                val_shard.iter_torch_batches(batch_size=512, dtypes=BATCH_DTYPES),
                                cfg, device, amp_dtype, rank=rank, world=world)
        epochs_run += 1
        if cfg.time_budget_min and progress.budget is None:
            measured = torch.tensor(time.perf_counter() - epoch_start, dtype=torch.float64, device=device)
            _all_reduce(measured, world, op="max")  # every worker must decide the same: the slowest one's time
            progress.budget = budget_decision(cfg, float(measured))
            epochs = progress.budget["epochs"]
            scheduler.lr_lambdas[0].set_epochs(epochs)
            if rank == 0:
                log_line(budget_line(progress.budget, cfg))
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": M.accuracy(cm),
            "val_macro_f1": M.macro_f1(cm),
            "images_per_s": seen / max(seconds, 1e-9),
            "epoch_time_s": seconds,
            "elapsed_s": elapsed_before + time.perf_counter() - run_start,
            "lr": optimizer.param_groups[0]["lr"],
        }
        progress.record(record, record[cfg.monitor_metric])
        if rank == 0:
            eta = (time.perf_counter() - run_start) / epochs_run * (epochs - epoch)
            log_line(
                f"[train] epoch {epoch}/{epochs}  train loss {train_loss:.4f}  train acc {train_acc:.3f}  "
                f"val acc {record['val_acc']:.3f}  val macro-F1 {record['val_macro_f1']:.3f}  "
                f"{record['images_per_s']:,.0f} img/s  ETA {_fmt_time(eta)}"
            )
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                _train_state.save(tmp, model=model, optimizer=optimizer, scheduler=scheduler,
                                  progress=progress, config=config, ema=ema)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(dict(record), checkpoint=ckpt)
        iteration_ends.append(time.perf_counter())


def replan(cfg: TrainConfig, progress, done: int, epochs: int, elapsed_s: float, iteration_ends: list[float],
           world: int, device, rank: int) -> int:
    """Correct a budgeted run's length from its steady epoch time: the mean wall time of this
    process's loop iterations after its first (train, validation, checkpoint and report; the first
    carries the data pipeline's and kernels' start-up, 1.3-1.6x a later one on FER2013, so a plan
    from it alone left 15-30 % of a 30-minute budget unused). Only while the cosine is in its first
    half, so the LR moves little when its end moves; recorded in ``progress.budget["replans"]``."""
    steady = (iteration_ends[-1] - iteration_ends[0]) / (len(iteration_ends) - 1)
    measured = torch.tensor([steady, elapsed_s], dtype=torch.float64, device=device)
    _all_reduce(measured, world, op="max")  # every worker decides the same
    steady, elapsed_s = (float(v) for v in measured)
    new = replan_epochs(progress.budget["budget_s"], elapsed_s, done, steady, cfg.epochs)
    if new != epochs:
        progress.budget["epochs"] = new
        progress.budget.setdefault("replans", []).append(
            {"after_epoch": done, "elapsed_s": round(elapsed_s, 3), "steady_epoch_s": round(steady, 3), "epochs": new})
        if rank == 0:
            log_line(f"[train] time budget: steady epoch {steady:.1f} s after epoch {done} ({elapsed_s:.0f} s of "
                     f"{progress.budget['budget_s']:.0f} s used) -> {new} epochs instead of {epochs}; "
                     f"cosine to its floor at epoch {new}")
    return new


def planned_epochs(cfg: TrainConfig, progress: _train_state.RunProgress) -> int:
    """The run's length on (re)start: ``--epochs``, or a budgeted run's stored decision; with
    another budget or cap than the stored one it is re-planned from the stored s/epoch (and
    ``progress.budget`` updated). A budgeted run not yet measured starts with the cap."""
    budget = progress.budget
    if not (cfg.time_budget_min and budget):
        return cfg.epochs
    if budget["budget_s"] != cfg.time_budget_min * 60 or budget["cap"] != cfg.epochs:
        progress.budget = budget = budget_decision(cfg, budget.get("replans", [{}])[-1].get("steady_epoch_s")
                                                   or budget["epoch_s"])
    return budget["epochs"]


def budget_decision(cfg: TrainConfig, epoch_s: float) -> dict:
    """What a ``--time-budget`` run records: the budget, the measured s/epoch (train + validation),
    the cap, and the epochs that fit."""
    budget_s = cfg.time_budget_min * 60
    return {"budget_s": budget_s, "epoch_s": epoch_s, "cap": cfg.epochs,
            "epochs": plan_epochs(budget_s, epoch_s, cfg.epochs)}


def budget_line(b: dict, cfg: TrainConfig) -> str:
    fits = int(b["budget_s"] // b["epoch_s"])
    capped = f" (the --epochs cap; {fits} would fit)" if fits > b["cap"] else ""
    return (f"[train] time budget {b['budget_s'] / 60:g} min: first epoch took {b['epoch_s']:.1f} s "
            f"(train + validation) -> {b['epochs']} epochs{capped}; LR warm-up {cfg.warmup_epochs:g} epoch(s), "
            f"cosine to its floor at epoch {b['epochs']}")


def train_one_epoch(model, criterion, optimizer, scheduler, scaler, shard, cfg: TrainConfig, epoch: int, epochs: int,
                    device, amp_dtype, rank: int, world: int, ema=None) -> tuple[float, float, int, float]:
    """One pass over this worker's shard. Returns (loss, accuracy, images, seconds), summed over
    all workers. Accuracy is against the un-mixed labels when MixUp/CutMix is on."""
    batch = cfg.per_worker_batch(world)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch * 101 + rank)
    aug = {"pixel_scale": 1.0 / float(cfg.input_spec.std[0])}
    mix = {"mixup": cfg.mixup, "cutmix": cfg.cutmix, "prob": cfg.mix_prob, "switch_prob": cfg.mix_switch_prob}
    total = cfg.steps_per_epoch(world) * batch * world
    bar = EpochProgress(f"epoch {epoch}/{epochs}", total) if rank == 0 else None
    model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for b in shard.iter_torch_batches(
        batch_size=batch,
        drop_last=True,
        local_shuffle_buffer_size=max(4 * batch, 1024),
        local_shuffle_seed=cfg.seed * 1000 + epoch * 10 + rank,
        dtypes=BATCH_DTYPES,
        device=device,
    ):
        x = normalize(b["image"], cfg.input_spec)
        if cfg.augment:
            x = augment(x, gen, **aug)
        if cfg.random_erasing:
            x = random_erasing(x, gen, cfg.random_erasing)
        y = target = b["label"]
        if cfg.mixup or cfg.cutmix:
            x, target = mix_batch(x, y, gen, len(cfg.classes), **mix)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss = criterion(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if bar is not None:
            bar.update(len(y) * world)
    seconds = time.perf_counter() - t0
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)])
    _all_reduce(totals, world)
    n = max(1.0, float(totals[2]))
    return float(totals[0]) / n, float(totals[1]) / n, int(totals[2]), seconds


@torch.no_grad()
def evaluate(model, batches, cfg: TrainConfig, device, amp_dtype=None, *, rank: int = 0,
             world: int = 1, tta: str = "none") -> tuple[np.ndarray, float]:
    """Confusion matrix (true x pred) and mean loss over all workers; this worker scores the
    rows with ``idx % world == rank``. ``tta`` averages the probabilities over views
    (:mod:`emotion_core.tta`)."""
    k = len(cfg.classes)
    model.eval()
    cm = torch.zeros(k * k, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for b in batches:
        images, labels = b["image"], b["label"]
        if world > 1:
            mine = b["idx"] % world == rank
            images, labels = images[mine], labels[mine]
        if len(labels) == 0:
            continue
        x = normalize(images.to(device, non_blocking=True), cfg.input_spec).contiguous(
            memory_format=torch.channels_last
        )
        y = labels.to(device, non_blocking=True).long()
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            probs = tta_probs(model, x, tta)
        loss_sum += F.nll_loss(torch.log(probs.clamp_min(1e-12)), y, reduction="sum").double()
        cm += torch.bincount(y * k + probs.argmax(1), minlength=k * k)
    _all_reduce(cm, world)
    _all_reduce(loss_sum, world)
    cm_np = cm.view(k, k).cpu().numpy()
    return cm_np, float(loss_sum) / max(1, int(cm_np.sum()))


def evaluate_checkpoint(checkpoint, dataset, config: dict, tta: str | None = None,
                        batch_size: int = 512) -> list[list[int]]:
    """Confusion matrix of a resume checkpoint's evaluation weights (the EMA when kept) on a
    decoded dataset (runs as a Ray task), fp32, with test-time augmentation ``tta`` (default: the
    run's ``--tta``)."""

    cfg = TrainConfig.from_dict(config)
    use_gpu = cfg.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    if not use_gpu:
        torch.set_num_threads(max(1, node_cpus()))
    model = cfg.create_model()
    with checkpoint.as_directory() as d:
        _train_state.load_eval_weights(d, model)
    model.to(device, memory_format=torch.channels_last)
    cm, _ = evaluate(model, dataset.iter_torch_batches(batch_size=batch_size, dtypes=BATCH_DTYPES), cfg, device,
                     tta=cfg.tta if tta is None else tta)
    return cm.tolist()


def quiet_ray_data() -> None:
    """No Ray Data progress bars or per-report INFO lines in the workers: the epoch bar and line
    are ours. Ray Data logs a note once per process when bars are off; it is expected here."""
    import logging

    import ray.data
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    log_once("ray_data_progress_manager_disabled")  # marks the "Progress bars disabled" note as shown
    for name in ("ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:  # Ray Train V2 logs every report at INFO under a logger named after its file path
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def log_line(text: str) -> None:
    """Print one line from a worker. Ray Train V2 patches print() and tees it to the log as well
    (duplicate lines on the driver), so write to stdout directly."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _silent(text: str) -> None:
    pass


class EpochProgress:
    """A progress line within an epoch, at most every ``every_s`` seconds (module doc)."""

    def __init__(self, desc: str, total: int, every_s: float = 15.0, out=None):
        self.desc, self.total, self.every_s, self.out = desc, max(1, total), every_s, out or log_line
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last < self.every_s or self.done >= self.total:
            return
        self.last = now
        rate = self.done / (now - self.t0)
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
        eta = (self.total - self.done) / max(rate, 1e-9)
        self.out(f"[train] {self.desc} [{bar}] {frac:4.0%} {self.done:,}/{self.total:,} img  "
                 f"{rate:,.0f} img/s  ETA {_fmt_time(eta)}")


def _all_reduce(t: torch.Tensor, world: int, op: str = "sum") -> None:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
