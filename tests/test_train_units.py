"""Pure pieces of training (no Ray): metrics, augmentation, LR schedule, class weights, and the
pickle-free checkpoint state round trip."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from emotion_core import metrics as M
from jobs._train_loop import augment, class_weights, load_state, lr_factor, make_optimizer, save_state


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
    from jobs._train_loop import resolve_precision

    assert resolve_precision("fp32", use_gpu=False) is None
    assert resolve_precision("bf16", use_gpu=False) is torch.bfloat16
    assert resolve_precision("auto", use_gpu=False) in (None, torch.bfloat16)


def test_class_weights():
    assert class_weights([10, 10], "none") is None
    w = class_weights([90, 10], "balanced")
    assert w[1] / w[0] == pytest.approx(9.0) and np.mean(w) == pytest.approx(1.0)
    s = class_weights([90, 10], "sqrt")
    assert s[1] / s[0] == pytest.approx(3.0)


def test_checkpoint_state_round_trip_without_pickle(tmp_path):
    from emotion_core.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn", 3)
    opt = make_optimizer(model, 1e-3, 0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 50, 5))
    for _ in range(3):
        loss = model(torch.randn(4, 1, 48, 48)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    state = {"epoch": 2, "history": [{"epoch": 1}, {"epoch": 2}], "best_score": 0.5, "best_epoch": 2, "bad_epochs": 0}
    save_state(str(tmp_path), model=model, optimizer=opt, scheduler=sched, state=state)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    expected_next = torch.rand(3)

    model2 = create_model("cnn", 3)
    opt2 = make_optimizer(model2, 1e-3, 0.05)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: lr_factor(s, 50, 5))
    got = load_state(str(tmp_path), model=model2, optimizer=opt2, scheduler=sched2)
    assert got["epoch"] == 2 and got["history"][-1]["epoch"] == 2
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid in s1["state"]:
        for k, v in s1["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][pid][k]))
    assert sched2.last_epoch == sched.last_epoch == 3
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored
