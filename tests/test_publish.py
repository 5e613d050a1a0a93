"""jobs.publish: publish, roll back and list model versions, locally and on moto's S3 server."""

from __future__ import annotations

import json

import pytest
import torch

from emotion_core import storage
from emotion_core.checkpoint import ModelManifest, export_model, load_model
from emotion_core.models import create_model, get_input_spec
from jobs.publish import main

CLASSES = ["angry", "happy", "sad"]


def _export(root: str, seed: int, day: int) -> tuple[str, ModelManifest]:
    torch.manual_seed(seed)
    manifest = ModelManifest(
        architecture="cnn",
        classes=CLASSES,
        input_spec=get_input_spec("cnn"),
        metrics={"accuracy": 0.5 + seed / 100, "macro_f1": 0.4},
        created_at=f"2026-03-0{day}T00:00:00Z",
    )
    return export_model(root, create_model("cnn", len(CLASSES)), manifest), manifest


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs" / "emonet" / "models")
    return f"s3://{request.getfixturevalue('s3_bucket')}/runs/emonet/models"


def test_publish_list_and_roll_back(root, capsys):
    pointer = root.split("/runs/")[0] + "/serving/latest.json"
    v1, m1 = _export(root, 1, 1)
    v2, m2 = _export(root, 2, 2)

    code, out, _ = _run(capsys, "--list", root, "--pointer", pointer)
    assert code == 0 and out.splitlines()[-1] == f"(no pointer at {pointer} yet)"

    code, out, err = _run(capsys, v2, "--pointer", pointer)
    assert code == 0 and err == ""
    assert out.strip() == f"published {pointer} -> {v2} (version {m2.version}, sha256 {m2.weights_sha256})"
    assert load_model(pointer)[1].version == m2.version

    code, out, _ = _run(capsys, "--list", root, "--pointer", pointer)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith(f"* {m2.version}  2026-03-02T00:00:00Z  cnn  accuracy 0.5200 macro_f1 0.4000  {v2}")
    assert lines[1].startswith(f"  {m1.version}  2026-03-01T00:00:00Z")

    # roll back: the older version is served again, exactly
    code, out, _ = _run(capsys, v1, "--pointer", pointer)
    assert code == 0 and out.strip().endswith(f"(was {m2.version})")
    assert json.loads(storage.read_bytes(pointer))["sha256"] == m1.weights_sha256
    model, manifest = load_model(pointer)
    reference, _ = load_model(v1)
    x = torch.randn(2, 1, 48, 48)
    assert manifest.version == m1.version and torch.equal(model(x), reference(x))
    code, out, _ = _run(capsys, "--list", root, "--pointer", pointer)
    assert out.splitlines()[1].startswith(f"* {m1.version}")


def test_a_corrupt_version_is_not_published(root, capsys):
    pointer = storage.join(root, "latest.json")
    v1, m1 = _export(root, 1, 1)
    v2, _ = _export(root, 2, 2)
    assert main([v1, "--pointer", pointer]) == 0
    blob = bytearray(storage.read_bytes(f"{v2}/model.safetensors"))
    blob[-1] ^= 0xFF
    storage.write_bytes(f"{v2}/model.safetensors", bytes(blob))
    capsys.readouterr()

    code, out, err = _run(capsys, v2, "--pointer", pointer)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"jobs.publish: error: {v2}/model.safetensors: corrupt")
    assert load_model(pointer)[1].version == m1.version  # the pointer is unchanged

    code, _, err = _run(capsys, storage.join(root, "20990101T000000Z-00000000"), "--pointer", pointer)
    assert code == 2 and "not found" in err and err.count("\n") == 1


def test_relative_local_model_path_is_published_absolute(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    v1, m1 = _export("models", 1, 1)
    assert v1 == str(tmp_path / "models" / m1.version)  # export_model returns an absolute URI
    assert main([f"models/{m1.version}", "--pointer", "serving/latest.json"]) == 0
    assert json.loads((tmp_path / "serving" / "latest.json").read_text())["model_uri"] == v1
    assert load_model(str(tmp_path / "serving" / "latest.json"))[1].version == m1.version


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "give the MODEL to publish, or --list MODELS_ROOT"),
        (["some/model"], "--pointer URI is required to publish"),
        (["some/model", "--list", "root"], "give either MODEL or --list MODELS_ROOT, not both"),
        (["some/model", "--pointer", "latest"], "must be a .json file"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    _, err = capsys.readouterr()
    assert e.value.code == 2 and err.count("\n") == 1 and expected in err


def test_list_empty_root_and_invalid_pointer(tmp_path, capsys):
    assert (
        _run(capsys, "--list", str(tmp_path / "none"))[1].strip()
        == f"(no complete model versions under {tmp_path / 'none'})"
    )
    (tmp_path / "bad.json").write_text(json.dumps({"model_uri": "x", "sha256": "nope"}))
    code, _, err = _run(capsys, "--list", str(tmp_path), "--pointer", str(tmp_path / "bad.json"))
    assert code == 2 and "field sha256 = 'nope'" in err and err.count("\n") == 1
