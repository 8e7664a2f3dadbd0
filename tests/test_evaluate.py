"""``featkd evaluate`` and ``featkd.api.evaluate_run``: a finished run's model.pt measured on a split."""

import json
import shutil

import pytest
import torch
from PIL import Image

import featkd.api as api
from featkd.cli import main
from featkd.data import load_splits

DATA = ["--data", "digits", "--image-size", "8", "--train-limit", "300", "--batch-size", "32", "--no-progress",
        "--device", "cpu"]
TINY = ["--width", "1/16", "--epochs", "4", "--lr", "0.01"]


def results(directory):
    return json.loads((directory / "results.json").read_text())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", "--model", "resnet9", *TINY, "--val-size", "100", "--out", str(out), *DATA]) == 0
    return out


@pytest.fixture(scope="module")
def simkd_dir(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("simkd")
    assert main(["distill", "--teacher-checkpoint", str(teacher_dir), "--student", "resnet9", "--student-width",
                 "1/16", "--method", "simkd", "--epochs", "2", "--runs", "2", "--out", str(out), *DATA]) == 0
    return out


def test_evaluate_run_gives_back_the_recorded_test_and_validation_accuracy(teacher_dir, caplog, monkeypatch):
    run = results(teacher_dir)["runs"][0]
    monkeypatch.setattr("featkd.train._CHANNELS_LAST_WARNED", set())
    test = api.evaluate_run(teacher_dir, device="cpu")
    assert "channels_last off" not in caplog.text  # resnet9 at 1/16 trains contiguous; predicting needs no warning
    assert test["accuracy"] == test["recorded_accuracy"] == run["final_test_acc"]
    assert test["data"] == "digits" and test["split"] == "test" and test["images"] == 359
    assert run["final_test_acc"] > 0.3  # chance is 0.1: a model that learnt, whose classes differ
    counts = load_splits("digits", image_size=8).test.labels.bincount()
    per_class = test["per_class_accuracy"]
    assert list(per_class) == [str(c) for c in range(10)]
    assert sum(a * n for a, n in zip(per_class.values(), counts.tolist())) / 359 == pytest.approx(test["accuracy"])
    val = api.evaluate_run(teacher_dir, "val", batch_size=7)
    assert val["accuracy"] == run["final_val_acc"] and val["images"] == 100 and val["recorded_accuracy"] is None
    assert api.evaluate_run(teacher_dir, "train")["images"] == 300


def test_evaluate_run_measures_the_deployed_network_of_each_run(simkd_dir):
    """SimKD predicts through the teacher's classifier: the network evaluated is the one deployed."""
    assert results(simkd_dir)["data_source"]["train_limit"] == 300  # the command's data, loaded as it said
    for run in results(simkd_dir)["runs"]:
        measured = api.evaluate_run(simkd_dir / f"run-{run['seed']}")
        assert measured["accuracy"] == measured["recorded_accuracy"] == run["final_test_acc"]
    with pytest.raises(ValueError, match="holds 2 runs"):
        api.evaluate_run(simkd_dir)
    with pytest.raises(ValueError, match="no validation split"):
        api.evaluate_run(simkd_dir / "run-0", "val")


def test_evaluate_run_on_other_data_resizes_it_and_checks_the_classes(teacher_dir):
    """Other data is made the run's image shape and normalised with the run's statistics; its
    classes must be the run's. (Resizing a folder of photos: the next test.)"""
    other = api.evaluate_run(teacher_dir, data="synthetic",  # RGB images: grey ones of the run's size here
                             data_options="num_classes:10,samples_per_class:2,test_per_class:3")
    assert other["images"] == 30 and other["recorded_accuracy"] is None and 0 <= other["accuracy"] <= 1
    with pytest.raises(ValueError, match=r"4 classes of images \[1, 8, 8\]; the run learnt 10 classes"):
        api.evaluate_run(teacher_dir, data="synthetic", data_options={"num_classes": 4, "samples_per_class": 2})
    with pytest.raises(ValueError, match="split must be train, val or test"):
        api.evaluate_run(teacher_dir, "holdout")


def test_evaluate_finds_the_runs_own_data_where_it_has_moved(tmp_path):
    for split, count in (("train", 4), ("test", 2)):
        for name, colour in (("dark", (20, 30, 40)), ("light", (220, 200, 180))):
            for k in range(count):
                (tmp_path / "photos" / split / name).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (12, 10), tuple(c + 5 * k for c in colour)).save(
                    tmp_path / "photos" / split / name / f"{k}.png")
    out = tmp_path / "run"
    assert main(["train-teacher", "--model", "resnet9", *TINY, "--data", "imagefolder", "--data-root",
                 str(tmp_path / "photos"), "--image-size", "8", "--batch-size", "4", "--no-progress",
                 "--out", str(out)]) == 0
    shutil.move(tmp_path / "photos", tmp_path / "moved")
    with pytest.raises(OSError):
        api.evaluate_run(out)
    measured = api.evaluate_run(out, data_root=str(tmp_path / "moved"))
    assert measured["accuracy"] == measured["recorded_accuracy"] == results(out)["runs"][0]["final_test_acc"]
    assert list(measured["per_class_accuracy"]) == ["dark", "light"]


def test_the_evaluate_command_prints_the_accuracy_per_class_or_json(teacher_dir, capsys):
    recorded = results(teacher_dir)["runs"][0]["final_test_acc"]
    assert main(["evaluate", str(teacher_dir), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"accuracy {recorded:.4f} on 359 test images of digits (the run recorded {recorded:.4f})"
    assert [line.split()[0] for line in lines[1:]] == [str(c) for c in range(10)]
    assert main(["evaluate", str(teacher_dir), "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 100


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--data-options", "num_classes:10"], "--data-options goes with --data"),
    (["--data", "nosuch"], "unknown dataset 'nosuch'"),
])
def test_the_evaluate_command_refuses_bad_input_in_one_line(teacher_dir, capsys, args, message):
    assert main(["evaluate", str(teacher_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featkd evaluate: error: ") and message in err and len(err.splitlines()) == 1


def test_the_evaluate_command_names_an_unfinished_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "holds no model.pt (is the run finished?)" in capsys.readouterr().err


def _api_teacher(train_set, test_set, out, **options):
    from featkd.models import create_model

    return api.train_teacher(lambda: create_model("resnet9", 10, 1, 8, 1 / 16), train_set, test_set,
                             model_name="resnet9", width=1 / 16, epochs=1, lr=0.01, out=out and str(out),
                             progress=False, device="cpu", **options)


def test_an_api_run_records_the_splits_it_learnt_from(tmp_path, caplog, monkeypatch):
    """Splits of load_splits name their settings: config.yaml and results.json say which images the
    run learnt from, and evaluate_run loads the same splits again (the validation split's seed too)."""
    import yaml

    splits = load_splits("digits", image_size=8, train_limit=300, seed=3, val_size=50, val_seed=2)
    monkeypatch.setattr("featkd.train._CHANNELS_LAST_WARNED", set())
    _api_teacher(splits.train, splits.test, tmp_path, val_set=splits.val)
    assert "channels_last off" in caplog.text  # resnet9 at 1/16 trains contiguous, and training says so
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (config["data"], config["image_size"], config["train_limit"], config["data_seed"],
            config["val_size"]) == ("digits", 8, 300, 3, 50)
    assert results(tmp_path)["data_source"] == {"data": "digits", "data_root": None, "image_size": 8,
                                                "data_options": {}, "train_limit": 300, "data_seed": 3,
                                                "val_size": 50, "val_seed": 2}
    run = results(tmp_path)["runs"][0]
    test = api.evaluate_run(tmp_path)
    assert test["accuracy"] == test["recorded_accuracy"] == run["final_test_acc"]
    val = api.evaluate_run(tmp_path, "val")
    assert val["accuracy"] == run["final_val_acc"] and val["images"] == 50
    assert api.evaluate_run(tmp_path, "train")["images"] == 300

    # A run from before data_source was recorded, whose config.yaml held the defaults rather than the
    # subset: the config is what is rebuilt, and the mismatch is warned about.
    summary = results(tmp_path)
    del summary["data_source"]
    (tmp_path / "results.json").write_text(json.dumps(summary))
    config.update(train_limit=None, data_seed=0, val_size=None)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    measured = api.evaluate_run(tmp_path)
    assert "normalised otherwise than the data it trained on" in caplog.text and measured["recorded_accuracy"] is None
    assert measured["images"] == 359


def test_a_config_naming_other_data_than_the_splits_given_is_warned_about(caplog):
    from featkd.config import TrainConfig

    splits = load_splits("synthetic", num_classes=10, samples_per_class=4, test_per_class=1, image_size=8,
                         in_channels=1)
    result = _api_teacher(splits.train, splits.test, None, config=TrainConfig(data="digits"))
    assert "the config names data 'digits' but the training images are synthetic's" in caplog.text
    assert result.extra["data_source"]["data"] == "synthetic"


def test_evaluate_run_asks_for_the_images_of_a_run_on_data_given_in_python(tmp_path, capsys):
    """A subset drawn outside featkd cannot be loaded again: config.yaml says in-memory rather than a
    dataset; evaluate_run, quality and train say so, and evaluate_run takes the images as dataset=
    (or other data by name)."""
    import yaml

    splits = load_splits("digits", image_size=8)
    subset = splits.train.subset(torch.arange(300))
    _api_teacher(subset, splits.test, tmp_path, image_size=8)
    assert results(tmp_path)["data_source"] is None
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"] == "in-memory"
    _api_teacher(subset, splits.test, tmp_path, image_size=8)  # the same call finds its finished run
    assert main(["quality", "--checkpoint", str(tmp_path), "--no-progress"]) == 2
    assert "in-memory stands for images given in Python" in capsys.readouterr().err
    assert main(["train-teacher", "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "again")]) == 2
    assert "in-memory stands for images given in Python" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    with pytest.raises(ValueError, match="images given in Python"):
        api.evaluate_run(tmp_path)
    measured = api.evaluate_run(tmp_path, dataset=splits.test)
    assert measured["accuracy"] == results(tmp_path)["runs"][0]["final_test_acc"]
    assert api.evaluate_run(tmp_path, data="digits")["images"] == 359
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "images given in Python" in capsys.readouterr().err


def test_evaluate_run_takes_a_dataset_at_hand(teacher_dir):
    splits = load_splits("digits", image_size=8, val_size=100)
    measured = api.evaluate_run(teacher_dir, dataset=splits.test)
    assert measured["accuracy"] == results(teacher_dir)["runs"][0]["final_test_acc"]
    assert measured["data"] == "digits/test" and measured["recorded_accuracy"] is None
    with pytest.raises(ValueError, match="not both"):
        api.evaluate_run(teacher_dir, dataset=splits.test, data="digits")
    with pytest.raises(TypeError, match="must be a featkd.data.ImageDataset, got list"):
        api.evaluate_run(teacher_dir, dataset=[splits.test.images])


def test_the_evaluate_command_has_help(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "--split {test,val,train}" in out and "--data-root DIR" in out
