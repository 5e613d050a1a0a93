"""The resume state of a training run (a Ray Train checkpoint), and reading a run's checkpoints.

This is *not* the exported model (that is :mod:`emotion_core.checkpoint`, ``model.json`` +
``model.safetensors``): it is what a worker needs to continue a run where it stopped. Its files
are named so the two cannot be confused, and nothing is pickled:

- ``train_weights.safetensors``, ``train_optimizer.safetensors`` (optimizer state tensors
  flattened to ``state.<param>.<name>``), ``train_rng.safetensors`` (torch RNG states), and with
  ``--ema`` ``train_ema.safetensors`` (the averaged weights; these are what is evaluated and
  exported, :func:`load_eval_weights`);
- ``train_state.json``, written last: format version, the run's :class:`RunProgress` (epoch,
  history, early-stopping state, the ``--time-budget`` decision), the :class:`TrainConfig` it was
  trained with, optimizer hyper-parameters and scalars, scheduler state, the EMA's update count,
  Python/NumPy RNG state, and the sha256 of each tensor file, checked on load.

Ray Train V2 records a run's checkpoints in its snapshot file; :func:`latest_run_state` reads
the state Ray Train will resume from, and :func:`remove_orphan_checkpoints` deletes checkpoint
directories that a killed run wrote but never registered.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow.fs as pafs
import torch

from emotion_core import storage

from ._cli import UsageError

FORMAT = 2
STATE_FILE = "train_state.json"
WEIGHTS_FILE = "train_weights.safetensors"
OPTIM_FILE = "train_optimizer.safetensors"
RNG_FILE = "train_rng.safetensors"
EMA_FILE = "train_ema.safetensors"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


class StateError(RuntimeError):
    """A resume checkpoint that cannot be read or fails its checksum."""


@dataclass
class RunProgress:
    """Where a run is: the last finished epoch, per-epoch history, early-stopping state, and for a
    ``--time-budget`` run the decision (``budget_s``, measured ``epoch_s``, ``cap``, ``epochs``),
    kept so a resumed run trains to the same length."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    budget: dict | None = None

    def record(self, record: dict, score: float) -> None:
        """Add a finished epoch's metrics; track the best ``score`` for early stopping."""
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, record["epoch"], 0
        else:
            self.bad_epochs += 1
        self.history.append(record)
        self.epoch = record["epoch"]

    def should_stop(self, patience: int) -> bool:
        return bool(patience) and self.bad_epochs >= patience

    @property
    def elapsed_s(self) -> float:
        return float(self.history[-1]["elapsed_s"]) if self.history else 0.0


def save(directory: str, *, model, optimizer, scheduler, progress: RunProgress, config: dict, ema=None) -> None:
    """Write a resume checkpoint into ``directory`` (module doc); ``ema`` is a
    :class:`jobs._train_recipe.ModelEma` or None."""
    from safetensors.torch import save_file

    from emotion_core.checkpoint import model_state_dict

    save_file(model_state_dict(model), os.path.join(directory, WEIGHTS_FILE))
    files = [WEIGHTS_FILE, OPTIM_FILE, RNG_FILE]
    if ema is not None:
        save_file(model_state_dict(ema.module), os.path.join(directory, EMA_FILE))
        files.append(EMA_FILE)
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
    state = {
        "format": FORMAT,
        "progress": asdict(progress),
        "config": config,
        "optimizer": {"param_groups": osd["param_groups"], "scalars": scalars},
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "ema": {"decay": ema.decay, "updates": ema.updates} if ema is not None else None,
        "python_rng": _py_rng_to_json(random.getstate()),
        "numpy_rng": np.random.get_state(legacy=False),
        "sha256": {f: _sha256(os.path.join(directory, f)) for f in files},
    }
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f, default=_json_default)


def read_state(directory: str) -> dict:
    """``train_state.json`` of a checkpoint directory, after checking every file's sha256."""
    try:
        with open(os.path.join(directory, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise StateError(f"{directory}: unreadable {STATE_FILE} ({e})") from e
    for name, digest in (state.get("sha256") or {}).items():
        path = os.path.join(directory, name)
        if not os.path.exists(path) or _sha256(path) != digest:
            raise StateError(f"{directory}: {name} is missing or fails its sha256 check")
    return state


def load(directory: str, *, model, optimizer=None, scheduler=None, ema=None) -> RunProgress:
    """Restore the model (and optimizer, scheduler, RNG, EMA when given) from a checkpoint
    directory. A checkpoint without EMA weights (a run resumed with ``--ema`` newly on) starts the
    EMA from the restored weights."""
    from safetensors.torch import load_file

    state = read_state(directory)
    target = model.module if hasattr(model, "module") else model
    target.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE)), strict=True)
    if ema is not None:
        if state.get("ema"):
            ema.module.load_state_dict(load_file(os.path.join(directory, EMA_FILE)), strict=True)
            ema.updates = int(state["ema"]["updates"])
        else:
            ema.module.load_state_dict(target.state_dict(), strict=True)
    if optimizer is not None:
        opt_state: dict = {}
        for key, value in load_file(os.path.join(directory, OPTIM_FILE)).items():
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
    return RunProgress(**state["progress"])


def load_eval_weights(directory: str, model) -> dict:
    """Load the weights to evaluate and export into ``model``: the EMA when the run kept one,
    else the training weights. Returns the checkpoint's ``train_state.json``."""
    from safetensors.torch import load_file

    state = read_state(directory)
    name = EMA_FILE if state.get("ema") else WEIGHTS_FILE
    model.load_state_dict(load_file(os.path.join(directory, name)), strict=True)
    return state


# ---------------------------------------------------------------------------------------------
# A run's checkpoints, as Ray Train records them


def latest_run_state(run_uri: str, log=print) -> dict | None:
    """``train_state.json`` of the checkpoint ``run_uri`` resumes from, or None for a new run.

    Ray Train V2 restores from its snapshot (the latest *registered* checkpoint), so that one is
    tried first, then the other checkpoint directories, newest first (a corrupt latest one falls
    back to the previous kept one, as the workers do). A run whose checkpoints or snapshot exist
    but cannot be read is an error, never silently a new run: it guards against resuming with
    another model."""
    snap = _snapshot(run_uri)
    latest = ((snap or {}).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    names = _checkpoint_dirs(run_uri)[::-1]
    if latest:
        names = [latest] + [n for n in names if n != latest]
    for name in names:
        uri = storage.join(run_uri, name, STATE_FILE)
        try:
            return json.loads(storage.read_bytes(uri))
        except (storage.StorageError, ValueError) as e:
            log(f"[train] checkpoint {name} is unreadable ({e}); trying the previous one")
    if names:
        raise UsageError(f"no readable checkpoint in run {run_uri}; pass a new --name or repair the run")
    return None


def restore(checkpoint, *, model, optimizer, scheduler, ema=None, log=print) -> RunProgress:
    """Load a Ray Train checkpoint (``ray.train.get_checkpoint()``) into the training objects;
    when it fails its checksums, fall back to the run's previous kept checkpoints, newest first."""
    candidates = [checkpoint] + _older_checkpoints(checkpoint)
    for candidate in candidates:
        try:
            with candidate.as_directory() as d:
                return load(d, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema)
        except StateError as e:
            log(f"[train] {e}; falling back to the previous checkpoint")
    raise StateError(f"none of the run's {len(candidates)} checkpoint(s) is readable")


def _older_checkpoints(checkpoint) -> list:
    from ray.train import Checkpoint

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    older = sorted(
        (i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
         and i.base_name < name),
        reverse=True,
    )
    return [Checkpoint(path=p, filesystem=fs) for p in older]


def remove_orphan_checkpoints(run_uri: str) -> None:
    """Delete checkpoint dirs that Ray Train does not track (written by a run killed before it
    registered them); the kept best-k and latest stay."""
    snap = _snapshot(run_uri)
    if snap is None:
        return
    tracked = {r.get("checkpoint_dir_name") for r in snap.get("checkpoint_results", [])}
    tracked.add((snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name"))
    for name in _checkpoint_dirs(run_uri):
        if name not in tracked:
            storage.delete_dir(storage.join(run_uri, name))


def _checkpoint_dirs(run_uri: str) -> list[str]:
    fs, path = storage.filesystem(run_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise UsageError(f"cannot list run folder {run_uri}: {e}") from e
    return sorted(
        i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
    )


def _snapshot(run_uri: str) -> dict | None:
    uri = storage.join(run_uri, SNAPSHOT_FILE)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri))
    except (storage.StorageError, ValueError) as e:
        raise UsageError(f"cannot read Ray Train's record of the run {uri} ({e})") from e


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
