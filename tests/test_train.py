"""jobs.train end to end on real local Ray (the shared `ray_session`), CPU, synthetic faces:
2-worker training beats chance and writes every artifact; data and checkpoints on the moto S3
server, where resume continues from the saved epoch; and each bad-input case exits 2 with one
line and publishes nothing. (.zip input is covered by tests/test_compare.py.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from emotion_core import storage
from jobs import _train_state, train

CLASSES = ("happy", "sad", "surprise")


@pytest.fixture(scope="session")
def faces3(tmp_path_factory):
    """3 clearly different expressions, 60 train + 20 test per class."""
    from emotion_core.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("faces3")
    generate_dataset(root, train_per_class=60, test_per_class=20, classes=CLASSES, seed=0)
    return root


def fast_args(data, output, *extra):
    """The cheapest sensible settings: classic CNN, small batches, no retries."""
    return ["--data", str(data), "--output", str(output), "--model", "cnn", "--batch-size", "32",
            "--lr", "0.005", "--max-failures", "0", "--warmup-epochs", "0.5", *extra]


@pytest.fixture(scope="module")
def trained(ray_session, faces3, tmp_path_factory):
    """One 2-worker run shared by the result, artifact and predict tests."""
    out = tmp_path_factory.mktemp("runs")
    pointer = out / "published" / "latest.json"
    rc = train.main(fast_args(faces3, out, "--name", "two", "--num-workers", "2", "--epochs", "6",
                              "--publish", str(pointer)))
    assert rc == 0
    return out / "two", pointer


def test_two_workers_beat_chance_and_write_artifacts(trained):
    run, pointer = trained
    m = json.loads((run / "metrics.json").read_text())
    assert m["eval_split"] == "test" and m["test"]["num_samples"] == 60
    assert m["test"]["accuracy"] > 0.5, m["test"]  # chance is 1/3
    assert m["test"]["classes"] == list(CLASSES)
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3, 4, 5, 6]
    assert m["config"]["num_workers"] == 2 and m["images_per_s"] > 0
    assert m["data"]["validation"] == "carved" and m["data"]["counts"]["validation"] == {c: 6 for c in CLASSES}
    for name in ("confusion_matrix.png", "training_curves.png", "split.json"):
        assert (run / name).stat().st_size > 0
    assert len(list(run.glob("checkpoint_*"))) <= 3  # best 2 + latest
    from emotion_core.checkpoint import load_model

    model, manifest = load_model(str(pointer))
    assert manifest.classes == list(CLASSES) and manifest.architecture == "cnn"
    assert manifest.metrics["accuracy"] == pytest.approx(m["test"]["accuracy"])
    assert json.loads(pointer.read_text())["model_uri"] == str(run / "models" / manifest.version)


def test_predict_cli(trained, faces3, tmp_path, capsys):
    from jobs import predict

    run, pointer = trained
    images = [str(next((faces3 / "test" / c).iterdir())) for c in CLASSES]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert predict.main(["--model", str(pointer), *images]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for line, img in zip(lines, images):
        assert line.split()[:5] == [img, "face", "0", "box", "0,0,48,48"] and line.split()[5] in CLASSES
        assert all(f"{c} 0." in line or f"{c} 1." in line for c in CLASSES)
    version = json.loads(pointer.read_text())["version"]
    assert predict.main(["--model", str(run / "models" / version), "--json", images[0], str(broken)]) == 1
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert rows[1]["error"].startswith("truncated") or rows[1]["error"].startswith("not_an_image")
    assert predict.main(["--model", str(tmp_path / "nothing"), images[0]]) == 2


def test_time_budget_with_every_recipe_option_on_a_class_subset(ray_session, faces3, tmp_path, capsys):
    """--time-budget times the first epoch, picks the epoch count (the same on both DDP workers),
    ends the cosine there, stays within the budget (plus one epoch of slack), and stores the
    decision for a resumed run; EMA, MixUp, CutMix, random erasing, TTA and --classes run end to
    end and are recorded in model.json."""
    from emotion_core.checkpoint import load_manifest

    args = fast_args(faces3, tmp_path, "--name", "budget", "--time-budget", "0.2", "--epochs", "40",
                     "--num-workers", "2", "--classes", "sad,happy", "--ema", "0.9", "--mixup", "0.2",
                     "--cutmix", "1.0", "--random-erasing", "0.25", "--tta", "flip")
    assert train.main(args) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "budget" / "metrics.json").read_text())
    b = m["time_budget"]
    assert b["budget_s"] == 12.0 and b["cap"] == 40 and b["epoch_s"] > 0
    first = max(1, min(40, int(12.0 // b["epoch_s"])))
    assert f"time budget 0.2 min: first epoch took {b['epoch_s']:.1f} s (train + validation) -> {first} epochs" in out
    for r in b.get("replans", []):  # corrected from the steady epoch time, in the cosine's first half only
        assert r["after_epoch"] >= 2 and r["steady_epoch_s"] > 0 and r["epochs"] > r["after_epoch"]
        assert f" s after epoch {r['after_epoch']} (" in out and f"-> {r['epochs']} epochs instead of" in out
    assert b["epochs"] == (b["replans"][-1]["epochs"] if b.get("replans") else first)
    assert m["epochs_completed"] == m["epochs_planned"] == b["epochs"] and not m["stopped_early"]
    assert m["config"]["patience"] == 0  # no early stopping in a budgeted run by default
    assert m["loop_time_s"] <= b["budget_s"] + b["epoch_s"]  # one epoch of slack
    if b["epochs"] > 1:  # decided after epoch 1: from epoch 2 on the cosine ends at the last epoch, at its floor
        assert m["history"][-1]["lr"] == pytest.approx(0.005 * 0.01)
    assert m["test"]["classes"] == ["happy", "sad"] and m["data"]["counts"]["test"] == {"happy": 20, "sad": 20}
    assert set(m["test"]["without_tta"]) == {"accuracy", "macro_f1"}
    manifest = load_manifest(m["model_uri"])
    assert manifest.classes == ["happy", "sad"] and manifest.metrics["weights"] == "ema"
    tc = manifest.training_config
    assert (tc["ema"], tc["mixup"], tc["cutmix"], tc["random_erasing"], tc["tta"], tc["time_budget_min"]) == \
        (0.9, 0.2, 1.0, 0.25, "flip", 0.2)
    assert tc["class_weighting"] == "sqrt" and tc["class_weights"] == pytest.approx([1.0, 1.0])  # default, balanced
    latest = _train_state.latest_run_state(str(tmp_path / "budget"))  # what a resumed run restores
    assert latest["progress"]["budget"] == b  # resuming keeps it (tests/test_train_units.py)


def test_s3_data_checkpoints_and_resume(ray_session, faces3, s3_bucket, capsys):
    """Data, checkpoints and models on the moto S3 server; then the README's resume command (the
    same command with more epochs: an interrupted run) continues from the saved epoch on S3,
    exports a new version and, without --publish, must not swap the live model."""
    from emotion_core.checkpoint import list_model_versions, load_model

    client = storage.s3_client()
    for path in faces3.rglob("*.jpg"):
        if path.parent.name != "sad":  # 2 classes keep it quick
            client.put_object(
                Bucket=s3_bucket, Key=f"data/{path.relative_to(faces3).as_posix()}", Body=path.read_bytes()
            )
    out, run = f"s3://{s3_bucket}/runs", f"s3://{s3_bucket}/runs/s3run"
    args = fast_args(f"s3://{s3_bucket}/data", out, "--name", "s3run")
    assert train.main([*args, "--epochs", "1", "--publish", f"{out}/latest.json"]) == 0
    m = json.loads(storage.read_bytes(f"{run}/metrics.json"))
    assert m["data"]["source"] == "s3" and m["test"]["classes"] == ["happy", "surprise"]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/s3run/")["Contents"]]
    assert any("/checkpoint_" in k and k.endswith("train_state.json") for k in keys)
    _, manifest = load_model(f"{out}/latest.json")
    assert {"runs/s3run/confusion_matrix.png", f"runs/s3run/models/{manifest.version}/model.json"} <= set(keys)
    assert manifest.classes == ["happy", "surprise"]
    served = storage.read_bytes(f"{out}/latest.json")
    weights = storage.read_bytes(f"{run}/models/{manifest.version}/model.safetensors")

    capsys.readouterr()
    assert train.main([*args, "--epochs", "2"]) == 0  # resumes, exports again, publishes nothing
    text = capsys.readouterr().out
    assert "resuming run" in text and "after epoch 1" in text
    second = json.loads(storage.read_bytes(f"{run}/metrics.json"))
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][:1] == m["history"]  # epoch 1 was not re-run
    assert second["history"][1]["elapsed_s"] > m["history"][0]["elapsed_s"]
    assert storage.read_bytes(f"{out}/latest.json") == served
    assert storage.read_bytes(f"{run}/models/{manifest.version}/model.safetensors") == weights
    versions = [v.version for v in list_model_versions(f"{run}/models")]
    assert len(versions) == 2 and manifest.version in versions
    assert load_model(f"{out}/latest.json")[1].version == manifest.version
    # a different model under the same name is refused instead of mixing checkpoints
    assert train.main([*args, "--epochs", "2", "--model", "emonet"]) == 2


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line on stderr, nothing published


def _bad(argv, capsys, tmp_path, expect: str):
    pointer = tmp_path / "pub" / "latest.json"
    rc = train.main([*argv, "--publish", str(pointer)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("jobs.train: error: ") and "\n" not in err and expect in err, err
    assert not pointer.exists()


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--model", "resnet9000"], "unknown model 'resnet9000'"),
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--batch-size", "-4"], "--batch-size must be a positive integer"),
        (["--name", "a/b"], "--name"),
        (["--time-budget", "0"], "--time-budget must be a positive number of minutes"),
        (["--ema", "1.5"], "--ema must be a decay in [0, 1)"),
        (["--random-erasing", "2"], "--random-erasing must be a probability"),
        (["--mixup", "-1"], "--mixup and --cutmix must not be negative"),
        (["--classes", "happy,grumpy"], "--classes: unknown emotion class 'grumpy'"),
        (["--classes", "happy"], "name at least two classes"),
        (["--classes", "happy,angry"], "--classes: no training images for angry"),
    ],
)
def test_bad_arguments(faces3, tmp_path, capsys, extra, expect):
    _bad([*fast_args(faces3, tmp_path / "out"), *extra], capsys, tmp_path, expect)


def test_too_many_workers(ray_session, faces3, tmp_path, capsys):
    _bad(fast_args(faces3, tmp_path / "out", "--num-workers", "64"), capsys, tmp_path, "--num-workers 64 needs 64 CPUs")


def test_unwritable_and_unreachable_output(s3_server, faces3, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    _bad(fast_args(faces3, blocker / "out"), capsys, tmp_path, "is not writable")
    _bad(fast_args(faces3, "s3://no-such-bucket-here/runs"), capsys, tmp_path, "is not writable")


def test_init_weights_of_wrong_shape(faces3, tmp_path, capsys):
    from safetensors.torch import save_file

    from emotion_core.models import create_model

    weights = tmp_path / "emonet.safetensors"
    save_file(create_model("emonet", 3).state_dict(), str(weights))
    _bad(fast_args(faces3, tmp_path / "out", "--init-weights", str(weights)), capsys, tmp_path, "--init-weights")


def test_bad_data(tmp_path, capsys):
    empty = tmp_path / "data"
    (empty / "train" / "happy").mkdir(parents=True)
    (empty / "train" / "sad").mkdir(parents=True)
    shutil.copy(__file__, empty / "train" / "happy" / "x.jpg")
    _bad(fast_args(empty, tmp_path / "out"), capsys, tmp_path, "class folder(s) with no images: train/sad")
    _bad(fast_args(tmp_path / "missing", tmp_path / "out"), capsys, tmp_path, "no such folder")
    os.remove(empty / "train" / "happy" / "x.jpg")
    Path(empty / "test" / "happy").mkdir(parents=True)
    _bad(fast_args(empty / "test", tmp_path / "out"), capsys, tmp_path, "no train/ split")


def test_cli_help_and_exit_code(tmp_path):
    """The real command line: --help documents every option; bad input exits 2 with one line."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, RAY_ADDRESS="")
    h = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--help"], cwd=root, capture_output=True, text=True, env=env
    )
    assert h.returncode == 0
    for opt in ("--data", "--model", "--output", "--name", "--epochs", "--batch-size", "--lr", "--num-workers",
                "--use-gpu", "--init-weights", "--seed", "--publish", "emonet", "efficientnet_b2", "RAY_ADDRESS",
                "--time-budget", "--classes", "--random-erasing", "--mixup", "--cutmix", "--ema", "--tta"):
        assert opt in h.stdout
    bad = subprocess.run([sys.executable, "-m", "jobs.train", "--data", str(tmp_path), "--model", "vgg"],
                         cwd=root, capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        == "jobs.train: error: unknown model 'vgg': use --model with one of cnn, efficientnet_b2, emonet, "
        "emonet_lite, emonet_s"
    )
