"""Checkpoints: round trips (local and S3), pointers, and every way a checkpoint can be broken."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

import numpy as np
import pytest
import torch
from torch import nn

from emotion_core import storage
from emotion_core.checkpoint import (
    CheckpointError,
    ModelManifest,
    dataset_fingerprint,
    export_model,
    list_model_versions,
    load_manifest,
    load_model,
    new_version_id,
    read_pointer,
    resolve_model_uri,
    save_model,
    write_pointer,
)
from emotion_core.labels import CANONICAL
from emotion_core.models import create_model, get_input_spec

CLASSES = ["angry", "happy", "sad"]


def _trained(name: str, classes=CLASSES, seed: int = 0) -> nn.Module:
    """A model whose weights and batch-norm statistics are not the fresh defaults."""
    torch.manual_seed(seed)
    model = create_model(name, len(classes))
    spec = get_input_spec(name)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, spec.channels, spec.size, spec.size))  # updates BN running stats
    return model.eval()


def _manifest(name: str, classes=CLASSES) -> ModelManifest:
    return ModelManifest(
        architecture=name,
        classes=list(classes),
        input_spec=get_input_spec(name),
        metrics={"val_accuracy": np.float32(0.75), "loss": torch.tensor(0.5)},
        training_config={"epochs": 2, "lr": 1e-3},
        dataset_fingerprint=dataset_fingerprint([("train/happy/1.jpg", 100)]),
    )


def _x(name: str) -> torch.Tensor:
    spec = get_input_spec(name)
    return torch.randn(2, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(7))


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _assert_roundtrip(uri: str, model: nn.Module, manifest: ModelManifest, name: str):
    loaded, m2 = load_model(uri)
    assert not loaded.training
    assert torch.equal(_predict(model, _x(name)), _predict(loaded, _x(name)))
    assert m2.to_dict() == manifest.to_dict()
    return loaded, m2


@pytest.fixture
def saved(tmp_path):
    """A small local cnn checkpoint: (dir, model, manifest)."""
    model = _trained("cnn")
    manifest = _manifest("cnn")
    d = str(tmp_path / "models" / "cnn" / manifest.version)
    save_model(d, model, manifest)
    return d, model, manifest


def _edit_json(d: str, **changes) -> None:
    path = f"{d}/model.json"
    data = json.loads(open(path).read())
    data.update(changes)
    open(path, "w").write(json.dumps(data))


def _error(uri: str) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(uri)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "emonet", "emonet_lite"])
def test_roundtrip_local(tmp_path, name):
    model, manifest = _trained(name), _manifest(name)
    d = str(tmp_path / "ckpt")
    assert save_model(d, model, manifest) == d
    _, m2 = _assert_roundtrip(d, model, manifest, name)
    blob = open(f"{d}/model.safetensors", "rb").read()
    assert m2.weights_sha256 == hashlib.sha256(blob).hexdigest()
    assert m2.num_parameters == sum(p.numel() for p in model.parameters())
    assert m2.metrics == {"val_accuracy": 0.75, "loss": 0.5}
    assert m2.format_version == 1 and m2.created_at.endswith("Z")
    assert load_manifest(d).version == manifest.version


def test_roundtrip_s3(s3_bucket):
    model, manifest = _trained("emonet"), _manifest("emonet")
    uri = f"s3://{s3_bucket}/models/emonet/{manifest.version}/"
    save_model(uri, model, manifest)
    keys = {o["Key"] for o in storage.s3_client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert {
        f"models/emonet/{manifest.version}/model.json",
        f"models/emonet/{manifest.version}/model.safetensors",
    } <= keys
    _assert_roundtrip(uri, model, manifest, "emonet")


def test_save_strips_ddp_prefix(tmp_path):
    class Wrapper(nn.Module):  # what DistributedDataParallel looks like to state_dict()
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = _trained("cnn")
    d = str(tmp_path / "ckpt")
    save_model(d, Wrapper(model), _manifest("cnn"))
    loaded, _ = load_model(d)
    assert torch.equal(_predict(model, _x("cnn")), _predict(loaded, _x("cnn")))


def test_resave_same_dir(saved):
    d, _, _ = saved
    model2, manifest2 = _trained("cnn", seed=5), _manifest("cnn")
    save_model(d, model2, manifest2)
    _assert_roundtrip(d, model2, manifest2, "cnn")


def test_save_refuses_manifest_that_does_not_fit(tmp_path):
    with pytest.raises(ValueError, match="do not fit architecture 'cnn' with 7 classes"):
        save_model(str(tmp_path / "x"), _trained("cnn"), _manifest("cnn", classes=list(CANONICAL)))
    with pytest.raises(ValueError, match="unknown architecture"):
        manifest = ModelManifest(architecture="vgg", classes=CLASSES, input_spec=get_input_spec("cnn"))
        save_model(str(tmp_path / "x"), _trained("cnn"), manifest)
    assert not (tmp_path / "x").exists()


# --- pointers ------------------------------------------------------------------------------


def test_pointer_local_relative_and_absolute(saved, tmp_path):
    d, model, manifest = saved
    rel_pointer = str(tmp_path / "models" / "cnn" / "latest.json")
    write_pointer(rel_pointer, manifest.version, manifest)  # relative to the pointer's directory
    pointer = json.loads(open(rel_pointer).read())
    assert pointer["version"] == manifest.version and pointer["classes"] == CLASSES
    assert (
        pointer["sha256"]
        == manifest.weights_sha256
        == hashlib.sha256(open(f"{d}/model.safetensors", "rb").read()).hexdigest()
    )
    assert resolve_model_uri(rel_pointer) == d
    _assert_roundtrip(rel_pointer, model, manifest, "cnn")
    # a directory with only latest.json is followed through it
    assert resolve_model_uri(str(tmp_path / "models" / "cnn")) == d

    abs_pointer = str(tmp_path / "elsewhere" / "prod.json")
    write_pointer(abs_pointer, d, manifest)
    _assert_roundtrip(abs_pointer, model, manifest, "cnn")
    # model.json itself also resolves to its directory
    assert resolve_model_uri(f"{d}/model.json") == d


def test_pointer_s3(s3_bucket):
    model, manifest = _trained("cnn"), _manifest("cnn")
    base = f"s3://{s3_bucket}/models/cnn"
    d = f"{base}/{manifest.version}"
    save_model(d, model, manifest)
    write_pointer(f"{base}/latest.json", d, manifest)
    _assert_roundtrip(f"{base}/latest.json", model, manifest, "cnn")
    write_pointer(f"{base}/relative.json", f"./{manifest.version}", manifest)
    assert resolve_model_uri(f"{base}/relative.json") == d


def test_pointer_to_nowhere(tmp_path, saved):
    _, _, manifest = saved
    pointer = tmp_path / "latest.json"
    pointer.write_text(json.dumps({"model_uri": str(tmp_path / "gone"), "version": "v"}))
    msg = _error(str(pointer))
    assert str(pointer) in msg and "gone" in msg and "no model.json" in msg
    with pytest.raises(CheckpointError, match="save the model before publishing"):
        write_pointer(str(pointer), str(tmp_path / "gone"), manifest)
    with pytest.raises(ValueError, match=r"must be a \.json file"):
        write_pointer(str(tmp_path / "latest"), str(tmp_path / "gone"), manifest)
    pointer.write_text(json.dumps({"something": "else"}))
    assert "neither a model pointer" in _error(str(pointer))


# --- immutable versions --------------------------------------------------------------------


def _export(root: str, seed: int, created_at: str, **kw) -> tuple[str, nn.Module, ModelManifest]:
    model, manifest = _trained("cnn", seed=seed), _manifest("cnn")
    manifest.created_at = created_at
    return export_model(root, model, manifest, **kw), model, manifest


def _files(d: str) -> dict[str, bytes]:
    return {n: storage.read_bytes(f"{d}/{n}") for n in ("model.json", "model.safetensors")}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_export_twice_keeps_the_first_version_unchanged(tmp_path, where, request):
    root = str(tmp_path / "run" / "models") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/run/models"
    d1, m1, man1 = _export(root, 1, "2026-01-01T00:00:00Z")
    assert d1 == f"{root}/{man1.version}"
    before = _files(d1)
    write_pointer(f"{root}/latest.json", d1, man1)
    d2, m2, man2 = _export(root, 2, "2026-01-02T00:00:00Z")
    assert d2 != d1 and _files(d1) == before
    assert [v.version for v in list_model_versions(root)] == [man2.version, man1.version]
    _assert_roundtrip(f"{root}/latest.json", m1, man1, "cnn")  # the published model is still served
    _assert_roundtrip(d2, m2, man2, "cnn")
    # the same version again is refused and changes nothing
    with pytest.raises(CheckpointError, match=f"version {man1.version} already exists and versions are immutable"):
        export_model(root, _trained("cnn", seed=3), man1)
    assert _files(d1) == before
    # pruning: keep 1 (the new one) + the protected published one; the other is deleted entirely
    d3, _, man3 = _export(root, 3, "2026-01-03T00:00:00Z", keep=1, protect=man1.version)
    assert [v.version for v in list_model_versions(root)] == [man3.version, man1.version]
    assert not storage.exists(f"{d2}/model.json") and not storage.exists(f"{d2}/model.safetensors")
    assert _files(d1) == before


def test_export_prunes_old_versions_but_keeps_protected(tmp_path):
    root = str(tmp_path / "models")
    first = _export(root, 0, "2026-01-01T00:00:00Z")[2].version
    for day in range(2, 6):
        _export(root, day, f"2026-01-0{day}T00:00:00Z", keep=2, protect=[first])
    versions = list_model_versions(root)
    assert [v.manifest.created_at[:10] for v in versions] == ["2026-01-05", "2026-01-04", "2026-01-01"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(v.version for v in versions)
    # the new version is kept even when its created_at is older than `keep` newer ones
    _, _, old = _export(root, 9, "2025-12-31T00:00:00Z", keep=1)
    assert [v.version for v in list_model_versions(root)] == [versions[0].version, old.version]
    with pytest.raises(ValueError, match="keep must be at least 1"):
        _export(root, 1, "2026-02-01T00:00:00Z", keep=0)


def test_interrupted_export_is_never_listed_nor_named(tmp_path):
    root = tmp_path / "models"
    d1, _, man1 = _export(str(root), 1, "2026-01-01T00:00:00Z")
    # an export killed after the weights, before model.json
    broken = root / "20260102T000000Z-deadbeef"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"half a file")
    assert [v.version for v in list_model_versions(str(root))] == [man1.version]
    with pytest.raises(CheckpointError, match="model.json: missing; save the model before publishing"):
        write_pointer(str(root / "latest.json"), str(broken), man1)
    assert "incomplete checkpoint" in _error(str(broken))
    # a pointer left naming it (e.g. written by hand) is refused too
    (root / "hand.json").write_text(json.dumps({"model_uri": str(broken)}))
    assert "holds no model.json" in _error(str(root / "hand.json"))
    # the next export keeps fresh debris (an export may be in progress) and deletes debris an hour older
    _export(str(root), 2, "2026-01-03T00:00:00Z")
    assert broken.exists()
    old = time.time() - 2 * 3600
    os.utime(broken / "model.safetensors", (old, old))
    os.utime(broken, (old, old))
    _export(str(root), 3, "2026-01-04T00:00:00Z")
    assert not broken.exists() and (root / man1.version / "model.json").exists()


def test_listing_reports_invalid_versions_and_never_prunes_them(tmp_path):
    root = str(tmp_path / "models")
    d1, _, man1 = _export(root, 1, "2026-01-01T00:00:00Z")
    _edit_json(d1, version="20990101T000000Z-00000000")
    _export(root, 2, "2026-01-02T00:00:00Z", keep=1)
    versions = list_model_versions(root)
    assert versions[-1].version == man1.version and versions[-1].manifest is None
    assert "directory name differs from model.json version" in versions[-1].problem
    assert list_model_versions(str(tmp_path / "nothing")) == []


# --- pointers name a version and its weights ------------------------------------------------


def test_pointer_refuses_a_model_replaced_in_place(saved, tmp_path):
    d, model, manifest = saved
    pointer = str(tmp_path / "latest.json")
    write_pointer(pointer, d, manifest)
    # what `jobs.train` did before: another model rewritten into the published directory
    save_model(d, _trained("cnn", seed=5), _manifest("cnn"))
    msg = _error(pointer)
    assert f"names version {manifest.version} with weights sha256 {manifest.weights_sha256}" in msg
    assert "was replaced after it was published" in msg
    with pytest.raises(CheckpointError, match="was replaced"):
        load_manifest(pointer)
    with pytest.raises(CheckpointError, match="was replaced"):
        resolve_model_uri(pointer)


def test_pointer_refuses_same_version_with_other_weights(saved, tmp_path):
    d, _, manifest = saved
    pointer = str(tmp_path / "latest.json")
    write_pointer(pointer, d, manifest)
    same_version = _manifest("cnn")
    same_version.version = manifest.version
    save_model(d, _trained("cnn", seed=5), same_version)
    load_model(d)  # the directory itself is a consistent model ...
    msg = _error(pointer)  # ... but not the one published
    assert f"sha256 {manifest.weights_sha256} but" in msg and f"sha256 {same_version.weights_sha256};" in msg


def test_old_pointer_without_sha256_is_checked_by_version(saved, tmp_path):
    d, model, manifest = saved
    pointer = tmp_path / "latest.json"
    pointer.write_text(json.dumps({"model_uri": d, "version": manifest.version, "architecture": "cnn"}))
    _assert_roundtrip(str(pointer), model, manifest, "cnn")
    assert read_pointer(str(pointer)).sha256 is None
    pointer.write_text(json.dumps({"model_uri": d, "version": "20200101T000000Z-00000000"}))
    assert "names version 20200101T000000Z-00000000 with weights sha256 None" in _error(str(pointer))


def test_write_pointer_refuses_a_manifest_of_another_model(saved, tmp_path):
    d, _, manifest = saved
    other = _manifest("cnn")
    other.weights_sha256 = "0" * 64
    with pytest.raises(
        CheckpointError, match=f"has version {manifest.version} with sha256 .* not version {other.version}"
    ):
        write_pointer(str(tmp_path / "latest.json"), d, other)
    assert not (tmp_path / "latest.json").exists()


@pytest.mark.parametrize(
    "pointer, expected",
    [
        ({"model_uri": ""}, "field model_uri = '': must be a non-empty string"),
        ({"model_uri": "x", "sha256": "abc"}, "field sha256 = 'abc': must be 64 lowercase hex"),
        ({"model_uri": "x", "version": 5}, "field version = 5: must be a model version id"),
    ],
)
def test_invalid_pointer(tmp_path, pointer, expected):
    path = tmp_path / "latest.json"
    path.write_text(json.dumps(pointer))
    msg = _error(str(path))
    assert msg.startswith(f"{path}: invalid model pointer:") and expected in msg
    assert read_pointer(str(tmp_path / "absent.json")) is None


def test_load_model_expect_sha256(saved):
    d, _, manifest = saved
    assert load_model(d, expect_sha256=manifest.weights_sha256)[1].version == manifest.version
    with pytest.raises(CheckpointError, match="the model changed since it was checked"):
        load_model(d, expect_sha256="0" * 64)


# --- broken checkpoints --------------------------------------------------------------------


def test_corrupt_weights(saved):
    d, _, _ = saved
    path = f"{d}/model.safetensors"
    blob = bytearray(open(path, "rb").read())
    for i in (len(blob) // 2, len(blob) - 1):
        blob[i] ^= 0xFF
    open(path, "wb").write(bytes(blob))
    msg = _error(d)
    assert msg.startswith(path) and "corrupt" in msg and "sha256" in msg


def test_truncated_weights_with_matching_checksum(saved):
    d, _, _ = saved
    path = f"{d}/model.safetensors"
    blob = open(path, "rb").read()[:100]
    open(path, "wb").write(blob)
    _edit_json(d, weights_sha256=hashlib.sha256(blob).hexdigest())
    msg = _error(d)
    assert msg.startswith(path) and "not a readable safetensors file" in msg


def test_missing_json(saved):
    d, _, _ = saved
    storage.delete_dir(f"{d}/model.json")
    msg = _error(d)
    assert msg.startswith(f"{d}/model.json") and "missing" in msg and "incomplete" in msg


def test_missing_weights(saved):
    d, _, _ = saved
    storage.delete_dir(f"{d}/model.safetensors")
    msg = _error(d)
    assert msg.startswith(f"{d}/model.safetensors") and "missing" in msg


def test_missing_directory(tmp_path):
    msg = _error(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in msg and "not found" in msg


def test_invalid_json(saved):
    d, _, _ = saved
    open(f"{d}/model.json", "w").write("{not json")
    msg = _error(d)
    assert msg.startswith(f"{d}/model.json") and "not valid JSON" in msg


_SPEC = {"size": 48, "channels": 1, "mean": [0.5], "std": [0.5]}


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"format_version": 2}, "field format_version = 2: not supported"),
        ({"format_version": "1"}, "field format_version = '1': not supported"),
        ({"architecture": "resnet50"}, "field architecture = 'resnet50': unknown architecture"),
        ({"architecture": 3}, "field architecture = 3: unknown architecture"),
        ({"classes": []}, "field classes = []: must be a non-empty list"),
        ({"classes": "angry"}, "field classes = 'angry': must be a non-empty list"),
        ({"classes": ["angry", "", "sad"]}, "'' is not a non-empty string"),
        ({"classes": ["angry", 7, "sad"]}, "7 is not a non-empty string"),
        ({"classes": ["angry", "Happy", "sad"]}, "'Happy' is not a canonical emotion"),
        ({"classes": ["angry", "angry", "sad"]}, "field classes = ['angry', 'angry', 'sad']: contains duplicates"),
        ({"input_spec": {"size": 48}}, "field input_spec = {'size': 48}: missing channels, mean, std"),
        ({"input_spec": [48, 1]}, "field input_spec = [48, 1]: must be a JSON object"),
        ({"input_spec": {**_SPEC, "size": 4}}, "field input_spec.size = 4: must be an integer in 8..1024"),
        ({"input_spec": {**_SPEC, "size": 4096}}, "field input_spec.size = 4096"),
        ({"input_spec": {**_SPEC, "size": "48"}}, "field input_spec.size = '48'"),
        ({"input_spec": {**_SPEC, "size": 48.5}}, "field input_spec.size = 48.5"),
        ({"input_spec": {**_SPEC, "channels": 2}}, "field input_spec.channels = 2: must be 1 or 3"),
        ({"input_spec": {**_SPEC, "mean": [0.5, 0.5]}}, "field input_spec.mean = [0.5, 0.5]: must be a list of 1"),
        ({"input_spec": {**_SPEC, "mean": ["x"]}}, "field input_spec.mean = ['x']"),
        ({"input_spec": {**_SPEC, "std": [0.0]}}, "field input_spec.std = [0.0]: must be > 0"),
        ({"input_spec": {**_SPEC, "std": [-1]}}, "field input_spec.std = [-1]: must be > 0"),
        ({"input_spec": {**_SPEC, "std": [float("inf")]}}, "field input_spec.std = [inf]: must be a list of 1 finite"),
        ({"input_spec": {**_SPEC, "mean": [float("nan")]}}, "field input_spec.mean = [nan]"),
        (  # the classic CNN built at 64 px has another dense layer than the weights saved at 48
            {"input_spec": {"size": 64, "channels": 1, "mean": [0.5], "std": [0.5]}},
            "fc1.weight",
        ),
        ({"metrics": [1]}, "field metrics = [1]: must be a JSON object"),
        ({"training_config": "x"}, "field training_config = 'x': must be a JSON object"),
        ({"dataset_fingerprint": "abc"}, "field dataset_fingerprint = 'abc': must be null or 64"),
        ({"created_at": "yesterday"}, "field created_at = 'yesterday': must be an ISO-8601 UTC time"),
        ({"created_at": "2026-02-30T00:00:00Z"}, "field created_at = '2026-02-30T00:00:00Z': is not a valid date"),
        ({"version": ""}, "field version = '': must be a non-empty string"),
        ({"version": 12}, "field version = 12: must be a non-empty string"),
        ({"version": "../escape"}, "field version = '../escape'"),
        ({"weights_sha256": None}, "field weights_sha256 = None: must be the sha256"),
        ({"weights_sha256": "ABC"}, "field weights_sha256 = 'ABC'"),
        ({"weights_sha256": "G" * 64}, "field weights_sha256 = 'GGGG"),
        ({"num_parameters": -1}, "field num_parameters = -1: must be a positive integer"),
        ({"num_parameters": 12}, "field num_parameters = 12 but architecture 'cnn' with 3 classes has 75987"),
    ],
)
def test_invalid_manifest(saved, changes, expected):
    d, _, _ = saved
    _edit_json(d, **changes)
    msg = _error(d)
    assert msg.startswith(f"{d}/model.") and expected in msg


@pytest.mark.parametrize("field", ["architecture", "classes", "input_spec", "created_at", "version", "weights_sha256"])
def test_missing_manifest_field(saved, field):
    d, _, _ = saved
    data = json.loads(open(f"{d}/model.json").read())
    del data[field]
    open(f"{d}/model.json", "w").write(json.dumps(data))
    assert f"missing field(s) {field}" in _error(d)


@pytest.mark.parametrize(
    "changes, expected",
    [
        (
            {"classes": ["angry", "happy"]},
            r"'fc2.weight' has shape \(3, 256\) in the file but the model expects \(2, 256\)",
        ),
        ({"architecture": "emonet"}, "is missing from the file"),
    ],
)
def test_manifest_does_not_match_weights(saved, changes, expected):
    d, _, _ = saved
    _edit_json(d, **changes)
    msg = _error(d)
    assert msg.startswith(f"{d}/model.safetensors: does not match {d}/model.json")
    assert re.search(expected, msg)


def test_corrupt_and_missing_on_s3(s3_bucket):
    model, manifest = _trained("cnn"), _manifest("cnn")
    d = f"s3://{s3_bucket}/m/v1"
    save_model(d, model, manifest)
    blob = bytearray(storage.read_bytes(f"{d}/model.safetensors"))
    blob[-1] ^= 0xFF
    storage.write_bytes(f"{d}/model.safetensors", bytes(blob))
    assert _error(d).startswith(f"{d}/model.safetensors: corrupt")
    assert "not found" in _error(f"s3://{s3_bucket}/m/v2")


# --- helpers -------------------------------------------------------------------------------


def test_version_ids_are_sortable_and_unique():
    a, b = new_version_id(), new_version_id()
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", a)
    assert a != b


def test_dataset_fingerprint_is_order_independent():
    items = [("train/happy/1.jpg", 10), ("train/sad/2.jpg", 20)]
    fp = dataset_fingerprint(items)
    assert fp == dataset_fingerprint(reversed(items))
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    assert fp != dataset_fingerprint([("train/happy/1.jpg", 11), ("train/sad/2.jpg", 20)])
