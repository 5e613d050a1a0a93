"""Test-time augmentation (emotion_core.tta): the views, the averaged probabilities, the cost helper."""

from __future__ import annotations

import pytest
import torch

import emotion_core as ec
from emotion_core.tta import shift, tta_cost, tta_probs, tta_views


def _model():
    torch.manual_seed(0)
    return ec.create_model("cnn", 3).eval()


def test_flip_is_the_mean_of_the_image_and_its_mirror():
    model = _model()
    x = torch.randn(5, 1, 48, 48)
    with torch.no_grad():
        got = tta_probs(model, x, "flip")
        want = (torch.softmax(model(x), 1) + torch.softmax(model(x.flip(-1)), 1)) / 2
        plain = tta_probs(model, x, "none")
    assert got.shape == (5, 3) and torch.allclose(got.sum(1), torch.ones(5))
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(plain, torch.softmax(model(x), 1), atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-4)  # the mirror is a different view for this model


def test_views_and_shift():
    x = torch.arange(2 * 1 * 48 * 48, dtype=torch.float32).view(2, 1, 48, 48)
    assert len(tta_views(x, "none")) == 1 and len(tta_views(x, "flip")) == 2
    views = tta_views(x, "flip+shift")
    assert len(views) == 4 and all(v.shape == x.shape for v in views)
    ten = tta_views(x, "flip+shift4")  # the image and its mirror at the centre and shifted 2 px 4 ways
    assert len(ten) == 10 and torch.equal(ten[1], x.flip(-1))
    assert torch.equal(ten[2], shift(x, 2, 2)) and torch.equal(ten[5], shift(x, -2, -2))
    assert torch.equal(ten[9], shift(x.flip(-1), -2, -2))
    assert len({tuple(v.flatten()[:200].tolist()) for v in ten}) == 10  # all different
    s = shift(x, 2, 2)
    assert torch.equal(s[..., 2:, 2:], x[..., :-2, :-2]) and (s[..., :2, :] == 0).all()
    assert torch.equal(shift(x, -1, 3)[..., :-1, 3:], x[..., 1:, :-3])
    with pytest.raises(ValueError, match="unknown TTA mode"):
        tta_views(x, "rotate")


def test_cost_helper_reports_images_per_second():
    rates = tta_cost(_model(), torch.randn(8, 1, 48, 48), "flip", repeats=2)
    assert len(rates) == 2 and all(r > 0 for r in rates)
