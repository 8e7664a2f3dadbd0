import json

import pytest
import torch

from featkd.cli import main
from featkd.quality import QualityReport
from featkd.selection import DEFAULT_RULE

BASE = ["quality", "--model", "resnet9", "--width", "1/16", "--data", "synthetic", "--device", "cpu"]


def test_quality_command_prints_table_and_writes_files(tmp_path, capsys):
    out = tmp_path / "q"
    status = main(BASE + ["--k", "2", "--out", str(out), "--variant", "corrected"])
    assert status == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert "sqrtIE" in lines[0]
    assert len([line for line in lines[1:7] if line.rstrip().endswith("*")]) == 2
    report = QualityReport.from_json(out / "quality.json")
    selected = report.select(2)
    assert f"selected by {DEFAULT_RULE} (k=2): {selected[0]},{selected[1]}" in printed  # auto's rule
    assert [row.index for row in report.layers] == list(range(6))  # resnet9: 6 GLs
    data = json.loads((out / "quality.json").read_text())
    assert data["variant"] == "corrected" and data["model"] == "resnet9"
    assert data["selected"][DEFAULT_RULE] == selected and data["settings"]["dataset"] == "synthetic"
    assert (out / "quality.png").read_bytes()[:4] == b"\x89PNG"


def test_quality_selects_what_distills_auto_takes(tmp_path, capsys):
    """The same weights, data, rule and k: `featkd quality` prints and writes the layers
    `featkd distill --teacher-layers auto` takes (never the stem GL 0 or a GL of the head)."""
    from featkd.api import _quality_layers
    from featkd.data import load_splits
    from featkd.models import create_model

    torch.manual_seed(0)
    teacher = create_model("resnet9", 10, in_channels=3, image_size=32, width=0.0625)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    train = load_splits("synthetic").train
    for i, rule in enumerate(["Q/paper", DEFAULT_RULE]):
        out = tmp_path / f"q{i}"
        assert main(BASE + ["--checkpoint", str(tmp_path / "teacher.pt"), "--by", rule, "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        auto = _quality_layers(teacher, "resnet9", 4, train, torch.device("cpu"), None, None, None, 5000, 0,
                               False, rule, None)
        assert 0 not in auto and f"selected by {rule} (k=4): {','.join(map(str, auto))}" in printed
        assert json.loads((out / "quality.json").read_text())["selected"][rule] == auto
        marked = [line.split()[0] for line in printed.splitlines() if line.endswith(" *")]
        assert marked == [str(t) for t in auto]

    # with distill's --val-size: the same training split, the probe scored on the held-out one
    splits = load_splits("synthetic", val_size=40)
    assert main(BASE + ["--checkpoint", str(tmp_path / "teacher.pt"), "--by", "probe", "--val-size", "40",
                        "--out", str(tmp_path / "qv")]) == 0
    auto = _quality_layers(teacher, "resnet9", 4, splits.train, torch.device("cpu"), None, None, None, 5000, 0,
                           False, "probe", splits.val)
    report = json.loads((tmp_path / "qv" / "quality.json").read_text())
    assert report["selected"]["probe"] == auto and report["settings"]["num_train"] == len(splits.train)


def test_layer_subset_and_selection_criterion(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(BASE + ["--layers", "4,1,2", "--by", "E", "--out", str(out)]) == 0
    report = QualityReport.from_json(out / "quality.json")
    assert [row.index for row in report.layers] == [1, 2, 4]
    printed = capsys.readouterr().out
    assert "selected by E (k=3): 1,2,4" in printed  # k capped at the layers measured
    as_teacher = ["--teacher" if arg == "--model" else arg for arg in BASE]  # the same option, named for its role
    assert main(as_teacher + ["--layers", "1,2", "--out", str(tmp_path / "t")]) == 0
    assert QualityReport.from_json(tmp_path / "t" / "quality.json").model == "resnet9"


def test_bad_layer_index_exits_2_with_valid_range(tmp_path, capsys):
    status = main(BASE + ["--layers", "1,9", "--out", str(tmp_path)])
    assert status == 2
    err = capsys.readouterr().err
    assert "valid indices 0..5" in err and "Traceback" not in err
    assert not (tmp_path / "quality.json").exists()
    assert main(BASE + ["--layers", "auto", "--out", str(tmp_path)]) == 2
    assert "'all' or GL indices" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [["--checkpoint", "no/such/model.pt"], ["--data", "fashion_mnist", "--data-root", "no/such/dir"]],
)
def test_missing_files_give_one_line_error(tmp_path, capsys, extra):
    status = main(BASE + extra + ["--out", str(tmp_path)])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("featkd quality: error:") and len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_selection_rule_and_precision_options(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(BASE + ["--by", "bands:S", "--k", "2", "--dtype", "float64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = QualityReport.from_json(out / "quality.json")
    assert f"selected by bands:S (k=2): {','.join(map(str, report.select(2, 'bands:S')))}" in printed
    assert report.settings["dtype"] == "float64" and report.has_probe and "probe" in printed.splitlines()[0]
    assert main(BASE + ["--out", str(out)]) == 0
    assert QualityReport.from_json(out / "quality.json").settings["dtype"] == "float32"  # the default
    capsys.readouterr()
    assert main(BASE + ["--by", "stages:S", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--by: unknown selection rule 'stages:S'; valid: Q, S" in err and "bands:probe" in err
    assert not (tmp_path / "bad").exists()


def test_without_checkpoint_the_model_is_seeded_and_the_user_warned(tmp_path, caplog):
    q_values = []
    for name in ("a", "b"):
        assert main(BASE + ["--layers", "3,4", "--out", str(tmp_path / name)]) == 0
        q_values.append(QualityReport.from_json(tmp_path / name / "quality.json").values("Q"))
    assert q_values[0] == q_values[1]  # the same --seed: the same random model
    assert "no --checkpoint: measuring a randomly initialised resnet9 (seed 0)" in caplog.text


def test_checkpoint_run_directory_gives_model_width_image_size_and_data(tmp_path, capsys, caplog):
    """A ViT teacher trained at 16 px (patch 2) only loads when measured at its own size."""
    teacher = tmp_path / "teacher"
    assert main(["train-teacher", "--model", "vit_et", "--width", "1/32", "--data", "synthetic",
                 "--image-size", "16", "--data-options", "num_classes:3,samples_per_class:6,in_channels:1",
                 "--val-size", "6", "--epochs", "1", "--batch-size", "6", "--device", "cpu", "--no-progress",
                 "--out", str(teacher)]) == 0
    out = tmp_path / "q"
    assert main(["quality", "--checkpoint", str(teacher), "--device", "cpu", "--subset-size", "12",
                 "--k", "2", "--out", str(out)]) == 0
    report = QualityReport.from_json(out / "quality.json")
    assert report.model == "vit_et" and report.settings["width"] == pytest.approx(1 / 32)
    assert report.settings["image_size"] == 16 and report.settings["dataset"] == "synthetic"
    assert report.settings["num_classes"] == 3 and len(report) == 9
    # the teacher's own training split (its validation split held out), which scores the probe
    assert report.settings["num_train"] == 12 and "held-out split of 6 images" in report.settings["probe"]
    capsys.readouterr()
    # the size given explicitly wins: a ViT built for 32 px does not fit the 16-px weights
    assert main(["quality", "--checkpoint", str(teacher), "--image-size", "32", "--device", "cpu",
                 "--subset-size", "12", "--out", str(tmp_path / "q32")]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["quality", "--data", "synthetic", "--out", str(tmp_path / "none")]) == 2
    assert "give --model" in capsys.readouterr().err
    # data options given are added to the run's (3 classes, 1 channel, 6 held out)
    assert main(["quality", "--checkpoint", str(teacher), "--device", "cpu", "--subset-size", "30",
                 "--data-options", "samples_per_class:10", "--out", str(tmp_path / "q10")]) == 0
    settings = QualityReport.from_json(tmp_path / "q10" / "quality.json").settings
    assert settings["num_train"] == 24 and settings["num_classes"] == 3
    assert "shifted inputs" not in caplog.text  # the same kind of images
    # noisier images than the teacher trained on: measured, with a warning
    assert main(["quality", "--checkpoint", str(teacher), "--device", "cpu", "--subset-size", "12",
                 "--data-options", "noise:0.9", "--out", str(tmp_path / "noisy")]) == 0
    assert "the teacher sees shifted inputs" in caplog.text


def test_data_options_reach_the_dataset_and_no_bar_is_drawn_off_a_terminal(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(BASE + ["--data-options", "num_classes:4,samples_per_class:5", "--out", str(out)]) == 0
    settings = QualityReport.from_json(out / "quality.json").settings
    assert settings["num_classes"] == 4 and settings["num_train"] == 20 and settings["width"] == 1 / 16
    assert "img/s" not in capsys.readouterr().err  # stderr is not a terminal here
    assert main(BASE + ["--data-options", "colour:red", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown option(s) ['colour']" in capsys.readouterr().err
    assert main(BASE + ["--data-options", "{a: [", "--out", str(tmp_path / "bad")]) == 2
    assert "--data-options must look like name:value" in capsys.readouterr().err


def test_the_rules_variant_is_measured_unless_contradicted(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(BASE + ["--by", "bands:Q/corrected", "--k", "2", "--out", str(out)]) == 0
    report = QualityReport.from_json(out / "quality.json")
    assert report.variant == "corrected"
    assert f"selected by bands:Q/corrected (k=2): {','.join(map(str, report.select(2, 'bands:Q')))}" in (
        capsys.readouterr().out)
    assert main(BASE + ["--by", "Q/corrected", "--variant", "paper", "--out", str(tmp_path / "bad")]) == 2
    assert "--by: rule Q/corrected ranks by knowledge quality in the corrected variant" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["quality", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert f"(default: {DEFAULT_RULE}, in --variant when that is given)" in text
    assert "images per forward pass (default: 256)" in text and "size of subset A (default: 5000)" in text
