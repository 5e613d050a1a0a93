"""Model registry: shapes per input spec, errors, no network, initialisation from weights files."""

from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import save_file

from emotion_core import storage
from emotion_core.models import (
    IMAGENET_MEAN,
    UnknownModelError,
    count_parameters,
    create_model,
    get_input_spec,
    list_models,
    model_descriptions,
)


def _input(name: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    spec = get_input_spec(name)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, spec.channels, spec.size, spec.size, generator=g)


def _out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


class NotATensor:
    """Something torch.load(weights_only=True) must refuse to unpickle."""


def test_registry_lists_the_models_with_specs():
    assert list_models() == ["cnn", "efficientnet_b2", "emonet", "emonet_lite", "emonet_s"]
    assert set(model_descriptions()) == set(list_models())
    for name in ("cnn", "emonet", "emonet_lite", "emonet_s"):
        spec = get_input_spec(name)
        assert (spec.size, spec.channels, spec.mean, spec.std) == (48, 1, (0.5,), (0.5,))
    spec = get_input_spec("efficientnet_b2")
    assert (spec.size, spec.channels, spec.mean) == (96, 3, IMAGENET_MEAN)


@pytest.mark.parametrize("name", ["cnn", "efficientnet_b2", "emonet", "emonet_lite", "emonet_s"])
def test_output_shape_for_input_spec(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3)
    y = _out(model, _input(name))
    assert y.shape == (2, 3)
    assert torch.isfinite(y).all()


def test_emonet_lite_has_one_conv_in_the_full_resolution_stages():
    convs = lambda m: [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    assert convs(create_model("emonet", 7)) == [32, 32, 64, 64, 128, 128, 256, 256]
    assert convs(create_model("emonet_lite", 7)) == [32, 64, 128, 128, 256, 256]
    assert convs(create_model("emonet_s", 7)) == [16, 32, 64, 64, 128, 128]  # emonet_lite at half width
    assert count_parameters(create_model("emonet_s", 7)) == 282_999


def test_cnn_is_the_keras_sequential_cnn():
    model = create_model("cnn", 7)
    # valid padding: 48 -> 46 -> 23 -> 21 -> 10 -> 8 -> 4, flatten 16*4*4
    assert model.fc1.in_features == 16 * 4 * 4
    # Keras summary of the same network: 160 + 4640 + 4624 + 65792 + 1799 parameters
    assert count_parameters(model) == 77015


def test_unknown_model_lists_choices():
    with pytest.raises(UnknownModelError, match="cnn, efficientnet_b2, emonet") as e:
        create_model("resnet9000", 7)
    assert isinstance(e.value, ValueError)
    with pytest.raises(UnknownModelError):
        get_input_spec("nope")


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        create_model("cnn", bad)


def test_models_are_built_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in list_models():
        create_model(name, 2)


def test_init_from_safetensors_same_classes(tmp_path):
    torch.manual_seed(1)
    src = create_model("emonet", 7)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    torch.manual_seed(2)
    dst = create_model("emonet", 7, init_weights=str(path))
    x = _input("emonet")
    assert torch.equal(_out(src, x), _out(dst, x))


def test_init_with_other_class_count_skips_only_the_head(tmp_path):
    torch.manual_seed(1)
    src = create_model("cnn", 7)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    dst = create_model("cnn", 3, init_weights=str(path))
    assert dst.fc2.weight.shape == (3, 256)
    for k, v in src.state_dict().items():
        if not k.startswith("fc2."):
            assert torch.equal(dst.state_dict()[k], v), k


def test_init_efficientnet_from_imagenet_shaped_file(tmp_path):
    """The main use: a 1000-class ImageNet EfficientNet-B2 file starts a 7-class model."""
    import timm

    src = timm.create_model("efficientnet_b2", pretrained=False, num_classes=1000)
    # a DDP-saved file: every key carries "module."
    path = tmp_path / "imagenet.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = create_model("efficientnet_b2", 7, init_weights=str(path))
    assert dst.classifier.weight.shape == (7, 1408)
    assert torch.equal(dst.conv_stem.weight, src.conv_stem.weight)
    assert torch.equal(dst.bn2.running_var, src.bn2.running_var)


def test_init_from_wrong_architecture_is_clear(tmp_path):
    path = tmp_path / "emonet.safetensors"
    save_file(create_model("emonet", 7).state_dict(), str(path))
    with pytest.raises(
        ValueError, match=r"do not fit model 'cnn'.*pass a weights file saved from 'cnn'"
    ) as e:
        create_model("cnn", 7, init_weights=str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_init_shape_mismatch_outside_head_names_parameter_and_shapes(tmp_path):
    sd = create_model("cnn", 7).state_dict()
    sd["conv1.weight"] = torch.zeros(16, 3, 3, 3)
    path = tmp_path / "rgb.safetensors"
    save_file(sd, str(path))
    with pytest.raises(
        ValueError, match=r"'conv1.weight' has shape \(16, 3, 3, 3\).*expects \(16, 1, 3, 3\)"
    ):
        create_model("cnn", 7, init_weights=str(path))


def test_init_missing_key_is_named(tmp_path):
    sd = create_model("cnn", 7).state_dict()
    del sd["conv2.bias"]
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="'conv2.bias' is missing"):
        create_model("cnn", 7, init_weights=str(path))


def test_init_from_pth_state_dict(tmp_path):
    torch.manual_seed(3)
    src = create_model("cnn", 7)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    dst = create_model("cnn", 7, init_weights=str(path))
    x = _input("cnn")
    assert torch.equal(_out(src, x), _out(dst, x))


def test_init_pth_is_never_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": create_model("cnn", 2).state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(ValueError, match="not a readable safetensors/torch state dict"):
        create_model("cnn", 2, init_weights=str(path))


def test_init_from_garbage_or_missing_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is not a weights file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        create_model("cnn", 2, init_weights=str(path))
    with pytest.raises(ValueError, match="cannot read weights file.*not found"):
        create_model("cnn", 2, init_weights=str(tmp_path / "missing.safetensors"))


def test_init_from_s3(s3_bucket):
    from safetensors.torch import save

    torch.manual_seed(4)
    src = create_model("cnn", 4)
    uri = f"s3://{s3_bucket}/weights/cnn.safetensors"
    storage.write_bytes(uri, save(src.state_dict()))
    dst = create_model("cnn", 4, init_weights=uri)
    x = _input("cnn")
    assert torch.equal(_out(src, x), _out(dst, x))


def test_public_api_is_importable_from_the_package_and_stays_light():
    import subprocess
    import sys

    import emotion_core as ec

    for name in ec.__all__:
        assert getattr(ec, name) is not None
    code = "import sys, emotion_core.schema, emotion_core.storage; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_create_model_passes_size_channels_and_options_through(tmp_path):
    import torch

    from emotion_core.checkpoint import ModelManifest, load_model, save_model
    from emotion_core.models import create_model, resolve_input_spec

    spec = resolve_input_spec("cnn", img_size=256, in_chans=3)
    assert (spec.size, spec.channels, spec.mean) == (256, 3, (0.5, 0.5, 0.5))
    cnn = create_model("cnn", 2, img_size=256, in_chans=3)
    assert cnn(torch.zeros(1, 3, 256, 256)).shape == (1, 2)
    narrow = create_model("emonet", 7, widths=(16, 32, 64, 128))
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in create_model("emonet", 7).parameters())
    with pytest.raises(ValueError, match="img_size"):
        resolve_input_spec("cnn", img_size=4)
    # the size, channels and options survive a save and load
    spec = resolve_input_spec("emonet", 64, 3)
    manifest = ModelManifest(architecture="emonet", classes=["happy", "sad"], input_spec=spec,
                             model_kwargs={"widths": [16, 32, 64, 128]})
    model = create_model("emonet", 2, img_size=64, in_chans=3, widths=(16, 32, 64, 128))
    save_model(str(tmp_path / "m"), model, manifest)
    loaded, m2 = load_model(str(tmp_path / "m"))
    assert m2.input_spec.channels == 3 and m2.input_spec.size == 64
    assert loaded(torch.zeros(1, 3, 64, 64)).shape == (1, 2)
