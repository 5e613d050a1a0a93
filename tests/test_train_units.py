"""Pure pieces of training (no Ray cluster): metrics, augmentation, LR schedule, class weights,
the typed config, and the pickle-free, checksummed resume state (round trip, corruption, fallback)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from emotion_core import metrics as M
from jobs import _train_state
from jobs._train_config import TrainConfig
from jobs._train_recipe import augment, class_weights, lr_factor, make_optimizer


def test_metrics_match_hand_computation():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 1, 1]
    cm = M.confusion_matrix(y_true, y_pred, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    pc = M.per_class(cm)
    assert np.allclose(pc["precision"], [1.0, 0.5, 0.0, 0.0])
    assert np.allclose(pc["recall"], [2 / 3, 1.0, 0.0, 0.0])
    assert np.allclose(pc["f1"], [0.8, 2 / 3, 0.0, 0.0])
    assert M.accuracy(cm) == pytest.approx(4 / 6)
    assert M.macro_f1(cm) == pytest.approx((0.8 + 2 / 3) / 4)
    s = M.summary(cm, ["a", "b", "c", "d"])
    json.dumps(s)
    assert s["per_class"]["b"]["support"] == 2
    table = M.format_table(s)
    assert "macro avg" in table and "accuracy" in table


def test_augment_is_vectorised_seeded_and_keeps_shape():
    x = torch.randn(16, 1, 48, 48)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    c = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    off = augment(x, torch.Generator(), shift=0, rotate_deg=0, zoom=0, hflip=False, brightness=0, contrast=0)
    assert torch.allclose(off, x, atol=1e-5)  # identity transform
    flipped = augment(x[:1].repeat(64, 1, 1, 1), torch.Generator().manual_seed(3), shift=0, rotate_deg=0, zoom=0,
                      brightness=0, contrast=0)
    exact_flips = [torch.allclose(f, x[0].flip(-1), atol=1e-5) for f in flipped]
    assert 10 < sum(exact_flips) < 54  # about half are mirrored


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 100, 10) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[100] == pytest.approx(0.01)


def test_precision_policy():
    from jobs._train_recipe import resolve_precision

    assert resolve_precision("fp32", use_gpu=False) is None
    assert resolve_precision("bf16", use_gpu=False) is torch.bfloat16
    assert resolve_precision("auto", use_gpu=False) in (None, torch.bfloat16)


def test_class_weights():
    assert class_weights([10, 10], "none") is None
    w = class_weights([90, 10], "balanced")
    assert w[1] / w[0] == pytest.approx(9.0) and np.mean(w) == pytest.approx(1.0)
    s = class_weights([90, 10], "sqrt")
    assert s[1] / s[0] == pytest.approx(3.0)


def _trained_objects(seed: int = 0):
    from emotion_core.models import create_model

    torch.manual_seed(seed)
    model = create_model("cnn", 3)
    opt = make_optimizer(model, 1e-3, 0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 50, 5))
    for _ in range(3):
        loss = model(torch.randn(4, 1, 48, 48)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _progress(epoch: int) -> _train_state.RunProgress:
    p = _train_state.RunProgress()
    for e in range(1, epoch + 1):
        p.record({"epoch": e, "elapsed_s": float(e)}, score=0.1 * e)
    return p


def _config() -> dict:
    from emotion_core.models import get_input_spec

    return TrainConfig(model="cnn", classes=("a", "b", "c"), input_spec=get_input_spec("cnn"), train_size=10).to_dict()


def test_train_config_round_trips_typed():
    from emotion_core.models import get_input_spec

    cfg = TrainConfig(model="cnn", classes=("a", "b"), input_spec=get_input_spec("cnn"), train_size=1000,
                      batch_size=128, class_weights=(0.5, 1.5))
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert back.per_worker_batch(2) == 64 and back.steps_per_epoch(2) == 7
    assert back.run_key == {"model": "cnn", "classes": ["a", "b"], "fingerprint": None, "faces": "none"}


def test_checkpoint_state_round_trip_without_pickle(tmp_path):
    from emotion_core.models import create_model

    model, opt, sched = _trained_objects()
    _train_state.save(str(tmp_path), model=model, optimizer=opt, scheduler=sched, progress=_progress(2),
                      config=_config())
    assert sorted(os.listdir(tmp_path)) == [
        "train_optimizer.safetensors", "train_rng.safetensors", "train_state.json", "train_weights.safetensors"
    ]
    expected_next = torch.rand(3)

    model2 = create_model("cnn", 3)
    opt2 = make_optimizer(model2, 1e-3, 0.05)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: lr_factor(s, 50, 5))
    got = _train_state.load(str(tmp_path), model=model2, optimizer=opt2, scheduler=sched2)
    assert got.epoch == 2 and got.history[-1]["epoch"] == 2 and got.best_epoch == 2
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid in s1["state"]:
        for k, v in s1["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][pid][k]))
    assert sched2.last_epoch == sched.last_epoch == 3
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored


def test_corrupt_checkpoint_fails_its_checksum_and_restore_falls_back(tmp_path):
    from ray.train import Checkpoint

    from emotion_core.models import create_model

    model, opt, sched = _trained_objects()
    older, newer = tmp_path / "checkpoint_2026-01-01_00-00-01", tmp_path / "checkpoint_2026-01-01_00-00-02"
    for d, epoch in ((older, 1), (newer, 2)):
        d.mkdir()
        _train_state.save(str(d), model=model, optimizer=opt, scheduler=sched, progress=_progress(epoch),
                          config=_config())
    weights = newer / "train_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(_train_state.StateError, match="sha256"):
        _train_state.read_state(str(newer))

    logged = []
    model2 = create_model("cnn", 3)
    opt2 = make_optimizer(model2, 1e-3, 0.05)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: lr_factor(s, 50, 5))
    got = _train_state.restore(Checkpoint.from_directory(str(newer)), model=model2, optimizer=opt2,
                               scheduler=sched2, log=logged.append)
    assert got.epoch == 1  # the previous kept checkpoint
    assert any("falling back" in line for line in logged)


def test_unreadable_run_state_is_an_error_not_a_new_run(tmp_path):
    from jobs._cli import UsageError

    assert _train_state.latest_run_state(str(tmp_path / "new-run")) is None
    ckpt = tmp_path / "run" / "checkpoint_2026-01-01_00-00-01"
    ckpt.mkdir(parents=True)
    (ckpt / "train_state.json").write_text("{not json")
    with pytest.raises(UsageError, match="no readable checkpoint"):
        _train_state.latest_run_state(str(tmp_path / "run"), log=lambda s: None)


def test_epoch_progress_prints_a_bar_with_rate_and_eta_at_most_every_interval():
    from jobs._train_worker import EpochProgress

    lines = []
    bar = EpochProgress("epoch 2/5", total=1000, every_s=0.0, out=lines.append)
    for _ in range(4):
        bar.update(200)
    bar.update(200)  # the end of the epoch is the summary line's job
    assert len(lines) == 4
    assert lines[1].startswith("[train] epoch 2/5 [########............]  40% 400/1,000 img")
    assert "img/s" in lines[1] and "ETA" in lines[1]
    quiet = EpochProgress("epoch 1/1", total=1000, every_s=3600, out=lines.append)
    quiet.update(500)
    assert len(lines) == 4


# ---------------------------------------------------------------------------------------------
# Recipe options (issue #13): random erasing, MixUp/CutMix, EMA, time budget


def test_random_erasing_replaces_one_box_per_chosen_image():
    from jobs._train_recipe import random_erasing

    x = torch.zeros(64, 1, 48, 48)
    assert random_erasing(x, torch.Generator(), 0.0) is x
    e = random_erasing(x, torch.Generator().manual_seed(0), 1.0)
    assert e.shape == x.shape and torch.equal(e, random_erasing(x, torch.Generator().manual_seed(0), 1.0))
    changed = (e != 0).float().mean(dim=(1, 2, 3))
    assert (changed > 0.01).all() and (changed < 0.36).all()  # every image, 2-33 % of its area
    for img in (e[:, 0] != 0):  # one axis-aligned box: its bounding box is full
        rows, cols = img.any(1).nonzero(), img.any(0).nonzero()
        box = img[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.float().mean() > 0.99
    half = random_erasing(x, torch.Generator().manual_seed(1), 0.5)
    assert 16 < int((half != 0).flatten(1).any(1).sum()) < 48  # about half the images


def test_mixup_and_cutmix_give_soft_targets_that_sum_to_one():
    from jobs._train_recipe import mix_batch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 48, 48)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    same, onehot = mix_batch(x, y, gen, 3)
    assert same is x and torch.equal(onehot, torch.nn.functional.one_hot(y, 3).float())
    assert mix_batch(x, y, gen, 3, mixup=0.2, prob=0.0)[0] is x

    mixed, t = mix_batch(x, y, gen, 3, mixup=1.0)
    assert mixed.shape == x.shape and t.shape == (8, 3) and torch.allclose(t.sum(1), torch.ones(8))
    lam = float(t[0, y[0]]) if y[0] != y[-1] else None  # image 0 is mixed with image 7
    assert lam is not None and torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-5)

    cut, t = mix_batch(x, y, gen, 3, cutmix=1.0)
    assert torch.allclose(t.sum(1), torch.ones(8))
    from_partner = (cut[0] == x[7]) & (cut[0] != x[0])
    assert float(from_partner.float().mean()) == pytest.approx(1 - float(t[0, y[0]]), abs=1e-6)
    assert ((cut[0] == x[0]) | (cut[0] == x[7])).all()  # every pixel comes from one of the pair

    picks = [mix_batch(x, y, torch.Generator().manual_seed(s), 3, mixup=0.2, cutmix=1.0)[0] for s in range(20)]
    n_cut = sum(bool(((p[0] == x[0]) | (p[0] == x[7])).all()) for p in picks)
    assert 2 < n_cut < 18  # both are used when both are on


def test_soft_targets_with_label_smoothing_match_hard_labels():
    from emotion_core.models import get_input_spec
    from jobs._train_recipe import make_criterion

    cfg = TrainConfig(model="cnn", classes=("a", "b", "c"), input_spec=get_input_spec("cnn"), train_size=10)
    crit = make_criterion(cfg, torch.device("cpu"))
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    assert crit(logits, torch.nn.functional.one_hot(y, 3).float()) == pytest.approx(float(crit(logits, y)))


def test_ema_math_and_copied_buffers():
    from jobs._train_recipe import ModelEma

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(8, 3))  # moves the batch-norm running statistics
    ema.update(model)  # first update: d = min(0.9, 1/10) = 0.1
    for e, s, p in zip(ema.module.parameters(), start, model.parameters()):
        assert torch.allclose(e, 0.1 * s + 0.9 * p)
    for eb, b in zip(ema.module.buffers(), model.buffers()):
        assert torch.equal(eb, b)
    for _ in range(200):
        ema.update(model)
    assert ema.updates == 201
    for e, p in zip(ema.module.parameters(), model.parameters()):
        assert torch.allclose(e, p, atol=1e-6)  # converges to constant weights
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_time_budget_plan_and_stretchable_schedule():
    from jobs._train_recipe import Schedule, plan_epochs

    assert plan_epochs(600, 55, 100) == 10  # floor: the last epoch still ends inside the budget
    assert plan_epochs(600, 5, 30) == 30  # --epochs is a cap
    assert plan_epochs(60, 300, 30) == 1  # at least one epoch

    # The cnn's 30-minute run on FER2013: first epoch 11.3 s planned 159 epochs, but later ones took
    # 7.0 s and the loop ended after 1,265 s. Corrected after epoch 2 (18 s used), it fills the budget.
    from jobs._train_recipe import replan_epochs

    assert plan_epochs(1800, 11.3, 300) == 159
    assert replan_epochs(1800, 18.0, 2, 7.0, 300) == 2 + 254
    assert replan_epochs(1800, 18.0, 2, 7.0, 200) == 200  # the cap still holds
    assert replan_epochs(100, 99.0, 4, 7.0, 300) == 5  # at least one more epoch

    # --epochs: 30 by default; with --time-budget the budget decides and the default cap is 1,000;
    # early stopping (--patience) is off with a budget unless asked for
    from jobs import train

    def defaults(*argv):
        args = train.build_parser().parse_args(["--data", "d", *argv])
        train.validate_args(args)
        return args.epochs, args.patience, args.model

    assert defaults() == (30, 10, "emonet_s")
    assert defaults("--time-budget", "30") == (1000, 0, "emonet_s")
    assert defaults("--time-budget", "30", "--epochs", "40", "--patience", "5") == (40, 5, "emonet_s")

    s = Schedule(steps_per_epoch=10, epochs=30, warmup_epochs=1)
    assert s(299) > 0.01 and s.warmup == 10
    s.set_epochs(5)
    assert s(50) == pytest.approx(0.01) and s(5) == pytest.approx(0.6) and s(25) < s(15)


def test_ema_and_budget_survive_the_resume_checkpoint(tmp_path):
    from emotion_core.models import create_model
    from jobs._train_recipe import ModelEma

    model, opt, sched = _trained_objects()
    ema = ModelEma(model, 0.99)
    for _ in range(3):
        ema.update(model)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.mul_(0.5)  # make the EMA differ from the weights
    progress = _progress(1)
    progress.budget = {"budget_s": 600.0, "epoch_s": 55.0, "cap": 100, "epochs": 10}
    _train_state.save(str(tmp_path), model=model, optimizer=opt, scheduler=sched, progress=progress,
                      config=_config(), ema=ema)
    assert (tmp_path / "train_ema.safetensors").exists()

    model2, opt2, sched2 = _trained_objects(seed=1)
    ema2 = ModelEma(model2, 0.99)
    got = _train_state.load(str(tmp_path), model=model2, optimizer=opt2, scheduler=sched2, ema=ema2)
    assert got.budget == progress.budget and ema2.updates == 3
    for a, b in zip(ema.module.state_dict().values(), ema2.module.state_dict().values()):
        assert torch.equal(a, b)
    exported = create_model("cnn", 3)
    _train_state.load_eval_weights(str(tmp_path), exported)  # the EMA, not the raw weights
    for a, b in zip(exported.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)

    plain = tmp_path / "plain"
    plain.mkdir()
    _train_state.save(str(plain), model=model, optimizer=opt, scheduler=sched, progress=progress, config=_config())
    ema3 = ModelEma(create_model("cnn", 3), 0.99)
    _train_state.load(str(plain), model=model2, ema=ema3)  # --ema newly on: starts from the weights
    for a, b in zip(ema3.module.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_resumed_budgeted_run_keeps_its_decided_epochs():
    from emotion_core.models import get_input_spec
    from jobs._train_worker import budget_decision, planned_epochs

    def cfg(**kw):
        return TrainConfig(model="cnn", classes=("a", "b"), input_spec=get_input_spec("cnn"), train_size=10, **kw)

    budgeted = cfg(epochs=100, time_budget_min=10.0)
    progress = _train_state.RunProgress()
    assert planned_epochs(budgeted, progress) == 100  # not measured yet: the cap
    progress.budget = budget_decision(budgeted, epoch_s=55.0)
    assert progress.budget == {"budget_s": 600.0, "epoch_s": 55.0, "cap": 100, "epochs": 10}
    assert planned_epochs(budgeted, progress) == 10  # the same command resumes to the same length
    assert planned_epochs(cfg(epochs=100, time_budget_min=20.0), progress) == 21  # a new budget: re-planned
    assert progress.budget["epochs"] == 21 and progress.budget["epoch_s"] == 55.0
    assert planned_epochs(cfg(epochs=30), progress) == 30  # no budget: --epochs
