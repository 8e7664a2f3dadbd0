"""``featkd train-teacher``, ``featkd distill`` and ``featkd report`` on tiny synthetic data."""

import json

import pytest
import yaml

from featkd.cli import main
from featkd.train import read_metrics

DATA = ["--data", "synthetic", "--data-options", "num_classes:3,samples_per_class:6,test_per_class:2",
        "--image-size", "8", "--batch-size", "6", "--no-progress", "--device", "cpu"]


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    argv = ["train-teacher", "--model", "resnet34", "--width", "1/16", "--epochs", "1", "--out", str(out), *DATA]
    assert main(argv) == 0
    return out


def test_train_teacher_writes_a_run_directory(teacher_dir):
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "model.pt", "results.json"):
        assert (teacher_dir / name).is_file(), name
    config = yaml.safe_load((teacher_dir / "config.yaml").read_text())
    assert config["model"] == "resnet34" and config["width"] == 0.0625
    record = read_metrics(teacher_dir)[0]
    for key in ("seed", "epoch", "loss_ce", "train_acc", "test_acc", "lr", "images_per_s", "epoch_time_s"):
        assert key in record


def test_distill_from_a_teacher_run_directory(teacher_dir, tmp_path, capsys, caplog):
    """--teacher-checkpoint RUN_DIR: weights from model.pt, teacher name and width from its config."""
    out = tmp_path / "fitnet"
    code, stdout, _ = run_cli(["distill", "--teacher-checkpoint", str(teacher_dir), "--student", "resnet9",
                               "--student-width", "1/16", "--method", "fitnet", "--epochs", "1",
                               "--out", str(out), *DATA], capsys)
    assert code == 0 and "final test acc" in stdout
    assert "shifted inputs" not in caplog.text  # the teacher's own data: no warning
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["teacher"] == "resnet34" and config["teacher_width"] == 0.0625
    results = json.loads((out / "results.json").read_text())
    assert results["teacher_layers"] == [3, 7, 13, 16] and results["method"] == "fitnet"
    assert {"loss_ce", "loss_kd", "loss_feat"} <= set(read_metrics(out)[0])

    code, stdout, _ = run_cli(["report", str(tmp_path)], capsys)
    assert code == 0 and "| fitnet |" in stdout and (tmp_path / "report.md").is_file()
    assert "Compared with" not in (tmp_path / "report.md").read_text()  # only against a reference named


def test_report_compares_run_directories_with_a_reference_over_their_seeds(tmp_path, capsys):
    for method in ("ce", "kd"):
        assert main(["distill", "--teacher", "resnet34", "--teacher-width", "1/16", "--student", "resnet9",
                     "--student-width", "1/16", "--method", method, "--epochs", "1", "--runs", "2",
                     "--out", str(tmp_path / method), *DATA]) == 0
    capsys.readouterr()
    code, stdout, _ = run_cli(["report", str(tmp_path), "--reference", "ce"], capsys)
    assert code == 0 and "compared with ce:" in stdout
    row = next(line for line in stdout.splitlines() if line.startswith("| kd | ce | 2 vs 2 |"))
    assert any(v in row for v in ("better", "worse", "no significant difference", "n/a (both samples constant"))
    text = (tmp_path / "report.md").read_text()
    assert "## Compared with `ce`" in text and "Welch's t-test" in text and "| kd | ce | 2 vs 2 |" in text
    before = text
    code, _, err = run_cli(["report", str(tmp_path), "--reference", "best"], capsys)
    assert code == 2 and "no run directory named 'best'" in err and "ce, kd" in err
    assert (tmp_path / "report.md").read_text() == before  # a bad name leaves the report as it was
    code, stdout, _ = run_cli(["report", str(tmp_path / "ce"), "--reference", "ce"], capsys)
    assert code == 0 and "no other run directory" in stdout
    assert "No other run directory to compare with." in (tmp_path / "ce" / "report.md").read_text()


def test_a_teacher_trained_on_otherwise_normalised_images_is_warned_about(teacher_dir, tmp_path, capsys, caplog):
    """The teacher's run records its input normalisation; distilling on data normalised otherwise warns."""
    from featkd.api import check_teacher_inputs, load_data
    from featkd.config import DistillConfig

    recorded = json.loads((teacher_dir / "results.json").read_text())
    assert len(recorded["input_mean"]) == 3 and all(s > 0 for s in recorded["input_std"])
    same = load_data(DistillConfig(data="synthetic", image_size=8, data_options={
        "num_classes": 3, "samples_per_class": 6, "test_per_class": 2}))[0]
    assert same.mean.tolist() == pytest.approx(recorded["input_mean"])
    assert check_teacher_inputs(teacher_dir, same) and check_teacher_inputs(teacher_dir / "model.pt", same)
    assert check_teacher_inputs(tmp_path, same)  # nothing recorded there: nothing to compare

    noisier = [a.replace("test_per_class:2", "test_per_class:2,noise:0.9") for a in DATA]
    code, _, _ = run_cli(["distill", "--teacher-checkpoint", str(teacher_dir), "--student", "resnet9",
                          "--student-width", "1/16", "--method", "kd", "--epochs", "1",
                          "--out", str(tmp_path / "kd"), *noisier], capsys)
    assert code == 0 and "the teacher sees shifted inputs" in caplog.text and "normalised with mean" in caplog.text
    caplog.clear()
    larger = ["16" if a == "8" else a for a in DATA]  # --image-size 16: a CNN teacher loads, at another scale
    code, _, _ = run_cli(["distill", "--teacher-checkpoint", str(teacher_dir), "--student", "resnet9",
                          "--student-width", "1/16", "--method", "kd", "--epochs", "1",
                          "--out", str(tmp_path / "kd16"), *larger], capsys)
    assert code == 0 and "trained on 3×8×8 images; this data has 3×16×16" in caplog.text


def test_init_checkpoint_run_directory_gives_model_width_and_weights(teacher_dir, tmp_path, capsys):
    from featkd.checkpoint import load_tensors

    out = tmp_path / "again"
    code, _, err = run_cli(["train-teacher", "--init-checkpoint", str(teacher_dir), "--epochs", "1",
                            "--lr", "1e-12", "--out", str(out), *DATA], capsys)
    assert code == 0, err
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"] == "resnet34" and config["width"] == 0.0625
    before, after = load_tensors(teacher_dir / "model.pt"), load_tensors(out / "model.pt")
    conv = "stem.conv.weight"  # no BatchNorm statistics: lr 1e-12 leaves it where it started
    assert (after[conv] - before[conv]).abs().max() < 1e-6


def test_a_missing_teacher_run_directory_is_named(tmp_path, capsys):
    code, _, err = run_cli(["distill", "--teacher-checkpoint", str(tmp_path / "no_such_run"), "--student",
                            "resnet9", "--out", str(tmp_path / "out"), *DATA], capsys)
    assert code == 2 and f"checkpoint not found: {tmp_path / 'no_such_run'}" in err


def test_config_file_then_options_then_overrides(teacher_dir, tmp_path, capsys):
    config_file = tmp_path / "distill.yaml"
    config_file.write_text(yaml.safe_dump({
        "teacher_checkpoint": str(teacher_dir), "student": "resnet9", "student_width": "1/16",
        "method": "featkd", "teacher_layers": [13, 14, 15, 16], "epochs": 5, "runs": 2,
    }))
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["distill", "--config", str(config_file), "--epochs", "3", "--out", str(out),
                               *DATA, "epochs=1", "runs=1", "teacher_mode=online"], capsys)
    assert code == 0, stdout
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["epochs"] == 1 and written["runs"] == 1 and written["teacher_mode"] == "online"
    assert written["teacher_layers"] == [13, 14, 15, 16]
    assert len(read_metrics(out)) == 1

    # same directory, different config: refused with a hint
    code, _, err = run_cli(["distill", "--config", str(config_file), "--out", str(out), *DATA,
                            "epochs=2", "runs=1", "teacher_mode=online"], capsys)
    assert code == 2 and "different config" in err and "new --out" in err and len(err.strip().splitlines()) == 1


def test_stop_and_resume_from_the_command_line(teacher_dir, tmp_path, capsys):
    out = tmp_path / "ce"
    args = ["distill", "--teacher-checkpoint", str(teacher_dir), "--student", "resnet9", "--student-width",
            "1/16", "--method", "ce", "--epochs", "2", "--out", str(out), *DATA]
    code, stdout, _ = run_cli([*args, "stop_after_epochs=1"], capsys)
    assert code == 0 and "rerun the same command to resume" in stdout and len(read_metrics(out)) == 1
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and [r["epoch"] for r in read_metrics(out)] == [1, 2]


def test_a_seed_run_alone_is_that_seed_of_several_runs_on_drawn_data(tmp_path, capsys):
    """The training subset (and generated data) come from --data-seed, not the run's seed."""
    args = ["train-teacher", "--model", "resnet9", "--width", "1/16", "--epochs", "1", "--train-limit", "12",
            *DATA]
    assert main([*args, "--runs", "2", "--out", str(tmp_path / "two")]) == 0
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--seed", "1", "--data-seed", "1", "--out", str(tmp_path / "other")]) == 0
    capsys.readouterr()

    def curve(run_dir):
        return [(r["loss_ce"], r["train_acc"], r["test_acc"]) for r in read_metrics(run_dir)]

    assert curve(tmp_path / "one") == curve(tmp_path / "two" / "run-1")
    assert curve(tmp_path / "other") != curve(tmp_path / "one")  # other images drawn

    # one run of several is a run directory too: model, width and data from the parent's config.yaml
    one_run = str(tmp_path / "two" / "run-1")
    assert main(["distill", "--teacher-checkpoint", one_run, "--student", "resnet9", "--student-width", "1/16",
                 "--method", "ce", "--epochs", "1", "--out", str(tmp_path / "student"), *DATA]) == 0
    assert yaml.safe_load((tmp_path / "student" / "config.yaml").read_text())["teacher_width"] == 0.0625
    assert main(["train-teacher", "--init-checkpoint", one_run, "--epochs", "1", "--out", str(tmp_path / "init"),
                 *DATA]) == 0
    assert main(["quality", "--checkpoint", one_run, "--layers", "3,4", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "q")]) == 0
    assert json.loads((tmp_path / "q" / "quality.json").read_text())["settings"]["num_train"] == 12


def test_quality_measures_what_auto_took_with_the_same_data_seed(teacher_dir, tmp_path, capsys):
    data = ["--train-limit", "12", "--val-size", "3", "--data-seed", "1"]
    assert main(["distill", "--teacher-checkpoint", str(teacher_dir), "--student", "resnet9", "--student-width",
                 "1/16", "--method", "featkd", "--teacher-layers", "auto", "--epochs", "1", *data,
                 "--out", str(tmp_path / "auto"), *DATA]) == 0
    assert main(["quality", "--checkpoint", str(teacher_dir), "--no-progress", *data,
                 "--out", str(tmp_path / "q"), *DATA[:4]]) == 0
    capsys.readouterr()
    auto, again = (json.loads((tmp_path / d / "quality.json").read_text()) for d in ("auto", "q"))
    measured = {row["index"]: row["Q"] for row in again["layers"]}  # every GL; auto: its candidates
    assert {row["index"]: row["Q"] for row in auto["layers"]}.items() <= measured.items()
    assert again["variant"] == auto["variant"]
    assert again["settings"]["seed"] == 1 and again["settings"]["num_train"] == 12


def test_bad_yaml_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    code, _, err = run_cli(["train-teacher", "--config", str(bad)], capsys)
    assert code == 2 and "not valid YAML" in err
    bad.write_text("- 1\n- 2\n")
    code, _, err = run_cli(["train-teacher", "--config", str(bad)], capsys)
    assert code == 2 and "mapping" in err


def test_nan_loss_exits_1_with_the_reason(tmp_path, capsys):
    code, _, err = run_cli(["train-teacher", "--model", "resnet9", "--width", "1/16", "--epochs", "2",
                            "--lr", "1e30", "--out", str(tmp_path), *DATA], capsys)
    assert code == 1 and ("is nan" in err or "is inf" in err), err
