"""What runs inside each Ray Train worker, plus the checkpoint state format.

Decisions:
- Data arrives as decoded uint8 pixels from Ray Data (``get_dataset_shard``); normalisation
  (:func:`emotion_core.preprocess.normalize`) and augmentation run on whole batch tensors on the
  worker's device, so augmentation costs one ``grid_sample`` per batch instead of per-image PIL
  work. Augmentation (training only): one random affine per image combining a crop-with-padding
  style shift, a small rotation, a mild zoom and a horizontal flip, then brightness/contrast
  jitter.
- ``--batch-size`` is the *global* batch; each of W workers takes ``batch // W``, so results do not
  depend on the worker count. Torch threads per worker = node CPUs // local workers.
- Precision and layout: channels_last everywhere (oneDNN's fast path on CPU too: 1.3x measured
  for EmoNet on 2 cores), bf16 autocast on GPUs that support it (fp16 + GradScaler on older
  ones) and on CPUs with native bf16 (AVX512-BF16/AMX: 1.9x measured); fp32 elsewhere. The
  exported model is plain fp32 weights either way. Test-set evaluation runs in fp32 on CPU.
- Validation: every worker reads the whole (small) validation set but scores only rows with
  ``idx % world == rank``; the k x k confusion matrices are summed with ``all_reduce``, so metrics
  are exact, with no rows dropped by an equal split.
- LR: AdamW, linear warm-up then cosine decay, as a pure function of the step so a resumed run
  with a larger ``--epochs`` simply stretches the remaining schedule.
- Checkpoints never pickle: ``model.safetensors``, ``optimizer.safetensors`` (optimizer state
  tensors flattened to ``state.<param>.<name>``), ``rng.safetensors`` and ``state.json`` (epoch,
  history, early-stopping state, scheduler state, optimizer hyper-parameters, Python/NumPy RNG).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"


# ---------------------------------------------------------------------------------------------
# Augmentation


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
    flip = torch.where(torch.rand(n, generator=gen, device=dev) < 0.5, -1.0, 1.0) if hflip else torch.ones(n, device=dev)
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


# ---------------------------------------------------------------------------------------------
# Checkpoint state (no pickle)


def save_state(directory: str, *, model, optimizer, scheduler, state: dict) -> None:
    from safetensors.torch import save_file

    from emotion_core.checkpoint import model_state_dict

    save_file(model_state_dict(model), os.path.join(directory, MODEL_FILE))
    osd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in osd["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    save_file(tensors, os.path.join(directory, OPTIM_FILE))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, os.path.join(directory, RNG_FILE))
    full = dict(state)
    full["optimizer"] = {"param_groups": osd["param_groups"], "scalars": scalars}
    full["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    full["python_rng"] = _py_rng_to_json(random.getstate())
    full["numpy_rng"] = np.random.get_state(legacy=False)
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(full, f, default=_json_default)


def read_state_json(directory: str) -> dict:
    with open(os.path.join(directory, STATE_FILE)) as f:
        return json.load(f)


def load_state(directory: str, *, model, optimizer=None, scheduler=None) -> dict:
    """Restore model (and optimizer, scheduler, RNG when given) from a checkpoint directory."""
    from safetensors.torch import load_file

    state = read_state_json(directory)
    target = model.module if hasattr(model, "module") else model
    target.load_state_dict(load_file(os.path.join(directory, MODEL_FILE)), strict=True)
    if optimizer is not None:
        tensors = load_file(os.path.join(directory, OPTIM_FILE))
        opt_state: dict = {}
        for key, value in tensors.items():
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
        for key, value in state["optimizer"]["scalars"].items():
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = value
        groups = [
            {k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in state["optimizer"]["param_groups"]
        ]  # JSON turned AdamW's betas tuple into a list
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if scheduler is not None:
        scheduler.load_state_dict(dict(state["scheduler"], lr_lambdas=[None] * len(optimizer.param_groups)))
    rng = load_file(os.path.join(directory, RNG_FILE))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_py_rng_from_json(state["python_rng"]))
    np.random.set_state(state["numpy_rng"])
    return state


def _py_rng_to_json(s: tuple) -> list:
    return [s[0], list(s[1]), s[2]]


def _py_rng_from_json(s: list) -> tuple:
    return (s[0], tuple(s[1]), s[2])


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot store {type(o).__name__} in {STATE_FILE}")


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def confusion_from_batches(model, batches, spec, num_classes: int, device, *, rank: int = 0, world: int = 1,
                           amp_dtype=None, channels_last: bool = False) -> tuple[np.ndarray, float]:
    """Confusion matrix (true x pred) and summed loss over the rows with ``idx % world == rank``."""
    from emotion_core.preprocess import normalize

    model.eval()
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        images, labels = batch["image"], batch["label"]
        if world > 1 and "idx" in batch:
            mine = batch["idx"] % world == rank
            images, labels = images[mine], labels[mine]
        if len(labels) == 0:
            continue
        x = normalize(images.to(device, non_blocking=True), spec)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels.to(device, non_blocking=True).long()
        with torch.autocast(device_type=x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        pred = logits.argmax(1)
        cm += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
    return cm, loss_sum


def evaluate_checkpoint(checkpoint, dataset, config: dict, batch_size: int = 512) -> list[list[int]]:
    """Confusion matrix of a Ray Train checkpoint on a decoded dataset (runs as a Ray task)."""
    from emotion_core.models import create_model
    from emotion_core.preprocess import InputSpec

    use_gpu = torch.cuda.is_available() and config.get("use_gpu")
    device = torch.device("cuda" if use_gpu else "cpu")
    if not use_gpu:
        torch.set_num_threads(max(1, _node_cpus()))
    model = create_model(config["model"], len(config["classes"]))
    with checkpoint.as_directory() as d:
        load_state(d, model=model)
    model.to(device)
    spec = InputSpec.from_dict(config["input_spec"])
    batches = dataset.iter_torch_batches(
        batch_size=batch_size, dtypes={"image": torch.uint8, "label": torch.int64, "idx": torch.int64}
    )
    amp = _amp_dtype() if use_gpu else None
    cm, _ = confusion_from_batches(model, batches, spec, len(config["classes"]), device, amp_dtype=amp)
    k = len(config["classes"])
    return cm.view(k, k).cpu().tolist()


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


def _node_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# The worker loop


def train_loop_per_worker(cfg: dict) -> None:
    import ray.train
    import ray.train.torch

    from emotion_core import metrics as M
    from emotion_core.models import create_model
    from emotion_core.preprocess import InputSpec, normalize

    quiet_ray_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = bool(cfg["use_gpu"])
    if not use_gpu:
        torch.set_num_threads(max(1, _node_cpus() // max(1, ctx.get_local_world_size())))
    device = ray.train.torch.get_device()
    spec = InputSpec.from_dict(cfg["input_spec"])
    classes = cfg["classes"]
    k = len(classes)
    epochs, seed = int(cfg["epochs"]), int(cfg["seed"])

    torch.manual_seed(seed + rank)
    model = create_model(cfg["model"], k, init_weights=cfg.get("init_weights"))
    if use_gpu or cfg.get("channels_last", True):
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)

    per_worker_batch = max(1, int(cfg["batch_size"]) // world)
    rows_per_worker = int(cfg["train_size"]) // world
    per_worker_batch = min(per_worker_batch, max(1, rows_per_worker))
    steps_per_epoch = max(1, rows_per_worker // per_worker_batch)
    total_steps = steps_per_epoch * epochs
    warmup = min(int(round(float(cfg["warmup_epochs"]) * steps_per_epoch)), total_steps // 2)
    optimizer = make_optimizer(model, float(cfg["lr"]), float(cfg["weight_decay"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    weights = cfg.get("class_weights")
    criterion = nn.CrossEntropyLoss(
        weight=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None,
        label_smoothing=float(cfg["label_smoothing"]),
    )
    amp_dtype = resolve_precision(cfg.get("precision", "auto"), use_gpu)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    channels_last = use_gpu or bool(cfg.get("channels_last", True))
    monitor = cfg["monitor"]

    state = {"epoch": 0, "history": [], "best_score": None, "best_epoch": None, "bad_epochs": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(d, model=model, optimizer=optimizer, scheduler=scheduler)
        if rank == 0:
            log_line(f"[train] resumed from checkpoint at epoch {state['epoch']}")

    aug = dict(cfg.get("augment") or {})
    aug.setdefault("pixel_scale", 1.0 / float(spec.std[0]))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    run_start, epochs_run = time.perf_counter(), 0
    prev_elapsed = float(state["history"][-1]["elapsed_s"]) if state["history"] else 0.0

    for epoch in range(int(state["epoch"]) + 1, epochs + 1):
        if cfg["patience"] and state["bad_epochs"] >= cfg["patience"]:
            break
        gen = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch * 101 + rank)
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        for batch in train_shard.iter_torch_batches(
            batch_size=per_worker_batch,
            drop_last=True,
            local_shuffle_buffer_size=max(4 * per_worker_batch, 1024),
            local_shuffle_seed=seed * 1000 + epoch * 10 + rank,
            dtypes={"image": torch.uint8, "label": torch.int64, "idx": torch.int64},
            device=device,
        ):
            x = augment(normalize(batch["image"], spec), gen, **aug)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["label"]
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
                loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        train_time = time.perf_counter() - t0
        totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)])
        _all_reduce(totals, world)
        train_loss = float(totals[0] / max(1.0, float(totals[2])))
        train_acc = float(totals[1] / max(1.0, float(totals[2])))
        images_per_s = float(totals[2]) / max(train_time, 1e-9)

        val_batches = val_shard.iter_torch_batches(batch_size=512, dtypes={"image": torch.uint8, "label": torch.int64, "idx": torch.int64})
        cm, val_loss_sum = confusion_from_batches(
            model, val_batches, spec, k, device, rank=rank, world=world, amp_dtype=amp_dtype, channels_last=channels_last
        )
        _all_reduce(cm, world)
        _all_reduce(val_loss_sum, world)
        cm_np = cm.view(k, k).cpu().numpy()
        val_acc, val_f1 = M.accuracy(cm_np), M.macro_f1(cm_np)
        epochs_run += 1
        elapsed_run = time.perf_counter() - run_start
        eta = elapsed_run / epochs_run * (epochs - epoch)

        score = val_f1 if monitor == "macro_f1" else val_acc
        if state["best_score"] is None or score > state["best_score"]:
            state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": float(val_loss_sum) / max(1, int(cm_np.sum())),
            "val_acc": val_acc,
            "val_macro_f1": val_f1,
            "images_per_s": images_per_s,
            "epoch_time_s": train_time,
            "elapsed_s": prev_elapsed + (time.perf_counter() - run_start),
            "lr": optimizer.param_groups[0]["lr"],
        }
        state["history"].append(record)
        state["epoch"] = epoch

        if rank == 0:
            log_line(
                f"[train] epoch {epoch}/{epochs}  train loss {train_loss:.4f}  train acc {train_acc:.3f}  "
                f"val acc {val_acc:.3f}  val macro-F1 {val_f1:.3f}  {images_per_s:,.0f} img/s  "
                f"ETA {_fmt_time(eta)}"
            )
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_state(tmp, model=model, optimizer=optimizer, scheduler=scheduler,
                           state=dict(state, run_key=cfg["run_key"]))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(dict(record), checkpoint=ckpt)


def quiet_ray_logs() -> None:
    """No Ray Data progress bars or per-report INFO lines: one progress line per epoch is ours."""
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
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


def _all_reduce(t: torch.Tensor, world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
