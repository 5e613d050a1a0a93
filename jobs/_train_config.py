"""``TrainConfig``: everything a training run needs, built once from the command line.

It crosses the Ray boundary as a plain dict (:meth:`TrainConfig.to_dict`), is rebuilt typed in
every worker (:meth:`TrainConfig.from_dict`), and is stored in each resume checkpoint and in the
exported model's ``training_config``, so a run can always say exactly how it was trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from emotion_core.preprocess import InputSpec


@dataclass(frozen=True)
class TrainConfig:
    model: str
    classes: tuple[str, ...]
    input_spec: InputSpec
    train_size: int  # readable training images, for the per-worker step count
    epochs: int = 30
    batch_size: int = 128  # global: each of W workers takes batch_size // W
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    class_weighting: str = "none"
    class_weights: tuple[float, ...] | None = None
    # recipe options (jobs._train_recipe); 0 = off
    random_erasing: float = 0.0  # probability per image
    mixup: float = 0.0  # Beta alpha
    cutmix: float = 0.0  # Beta alpha
    mix_prob: float = 1.0  # probability that a batch is mixed (when mixup or cutmix is on)
    mix_switch_prob: float = 0.5  # with both on: probability of CutMix for a mixed batch
    ema: float = 0.0  # EMA decay of the weights; the EMA is evaluated and exported
    tta: str = "none"  # test-time augmentation of the final evaluation (emotion_core.tta)
    time_budget_min: float | None = None  # wall-clock minutes of the training loop; epochs is then a cap
    monitor: str = "macro_f1"  # or "accuracy": early stopping and best checkpoint
    patience: int = 10
    seed: int = 0
    augment: bool = True
    use_gpu: bool = False
    precision: str = "auto"
    num_workers: int = 1
    init_weights: str | None = None
    dataset_fingerprint: str | None = None
    faces: str = "none"  # face detector that cropped the training images (emotion_core.faces); none = whole images

    @property
    def monitor_metric(self) -> str:
        """The name of the reported metric that ``monitor`` selects."""
        return "val_macro_f1" if self.monitor == "macro_f1" else "val_acc"

    @property
    def run_key(self) -> dict:
        """What must match for a run to resume another: model, classes, data and how faces are cut."""
        return {"model": self.model, "classes": list(self.classes), "fingerprint": self.dataset_fingerprint,
                "faces": self.faces}

    def create_model(self, init_weights: str | None = None):
        """The architecture at this run's input size and channels."""
        from emotion_core.models import create_model

        return create_model(self.model, len(self.classes), init_weights=init_weights,
                            img_size=self.input_spec.size, in_chans=self.input_spec.channels)

    def per_worker_batch(self, world: int) -> int:
        rows = self.train_size // world
        return max(1, min(self.batch_size // world, max(1, rows)))

    def steps_per_epoch(self, world: int) -> int:
        return max(1, (self.train_size // world) // self.per_worker_batch(world))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        d["input_spec"] = self.input_spec.to_dict()
        d["class_weights"] = list(self.class_weights) if self.class_weights else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["classes"] = tuple(d["classes"])
        d["input_spec"] = InputSpec.from_dict(d["input_spec"])
        if d.get("class_weights") is not None:
            d["class_weights"] = tuple(d["class_weights"])
        return cls(**d)
