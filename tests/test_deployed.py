"""The deployed network of a run: model.pt, load_trained_model, deployed_params; KD settings via the API."""

import json

import pytest
import torch

import featkd.api as api
from featkd.config import DistillConfig
from featkd.data import BatchLoader, get_datasets
from featkd.distillation import TappedNetwork, used_parameter_count
from featkd.models import create_model
from featkd.report import comparison_rows, load_run
from featkd.train import ClassifierModel, channels_last_format, evaluate, read_metrics

WIDTH = 1 / 16
FAST = dict(batch_size=8, eval_batch_size=64, progress=False, device="cpu", epochs=2)
ZOO = dict(teacher_name="resnet34", student_name="resnet9", teacher_width=WIDTH, student_width=WIDTH)


@pytest.fixture(scope="module")
def data():
    return get_datasets("synthetic", num_classes=3, samples_per_class=8, test_per_class=4, image_size=8)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return create_model("resnet34", 3, 3, 8, WIDTH).eval()


def student():
    return create_model("resnet9", 3, 3, 8, WIDTH)


def accuracy(model, test_set):
    loader = BatchLoader(test_set, 64, shuffle=False)
    return evaluate(ClassifierModel(model).eval(), loader, torch.device("cpu"), "none", channels_last_format(model))


def results(directory):
    return json.loads((directory / "results.json").read_text())


def test_simkd_run_saves_and_reloads_its_deployed_network(tmp_path, data, teacher):
    train, test = data
    result = api.distill(teacher, student, train, test, method="simkd", out=str(tmp_path), **ZOO, **FAST)
    summary = results(tmp_path)
    assert summary["teacher_layers"] == [16] and summary["student_layers"] == [4]   # classifier inputs
    assert summary["num_classes"] == 3 and summary["image_shape"] == [3, 8, 8]
    assert {k for r in read_metrics(tmp_path) for k in r if k.startswith("loss_")} == {"loss_feat"}

    model = api.load_trained_model(tmp_path)
    assert isinstance(model, TappedNetwork) and not model.training
    assert accuracy(model, test) == summary["runs"][0]["final_test_acc"] == result.runs[0].final_test_acc
    x, _, _ = test.batch(torch.arange(2))
    deployed = used_parameter_count(model, x)
    assert summary["deployed_params"] == result.extra["deployed_params"] == deployed
    unused_head = sum(p.numel() for p in model.backbone.fc.parameters())
    every = sum(p.numel() for p in model.parameters())
    assert deployed == every - unused_head
    assert comparison_rows([load_run(tmp_path)])[0]["params"] == f"{deployed:,}"     # featkd report's table
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(model(x), result.model.eval()(x))          # the run's model is the same network


def test_featkd_runs_reload_the_student_from_each_run_directory(tmp_path, data, teacher):
    train, test = data
    result = api.distill(teacher, student, train, test, method="featkd", teacher_layers=[12, 13, 14, 15],
                         out=str(tmp_path), runs=2, **ZOO, **FAST)
    summary = results(tmp_path)
    assert summary["deployed_params"] == sum(p.numel() for p in student().parameters())
    for run in result.runs:
        model = api.load_trained_model(tmp_path / f"run-{run.seed}")
        assert type(model) is type(student()) and accuracy(model, test) == run.final_test_acc
    with pytest.raises(ValueError, match="holds 2 runs"):
        api.load_trained_model(tmp_path)


def test_runs_started_without_model_names_reload_when_the_student_is_the_deployed_network(tmp_path, data, teacher):
    """A run that names only the student: its featkd run reloads; a SimKD run, whose deployed
    network holds the teacher's classifier, says that it needs the teacher's name."""
    train, test = data
    names = dict(student_name="resnet9", student_width=WIDTH)
    result = api.distill(teacher, student, train, test, method="featkd", teacher_layers=[12, 13, 14, 15],
                         out=str(tmp_path / "featkd"), **names, **FAST)
    model = api.load_trained_model(tmp_path / "featkd")
    assert type(model) is type(student()) and accuracy(model, test) == result.runs[0].final_test_acc
    api.distill(teacher, student, train, test, method="simkd", out=str(tmp_path / "simkd"), **names, **FAST)
    with pytest.raises(ValueError, match="holds a part of the teacher.*names no teacher"):
        api.load_trained_model(tmp_path / "simkd")


def test_train_teacher_runs_record_and_reload_the_model(tmp_path, data):
    train, test = data
    result = api.train_teacher(student, train, test, model_name="resnet9", width=WIDTH, out=str(tmp_path),
                               lr=0.01, **FAST)
    summary = results(tmp_path)
    assert summary["deployed_params"] == sum(p.numel() for p in student().parameters())
    assert accuracy(api.load_trained_model(tmp_path), test) == result.runs[0].final_test_acc


def test_load_trained_model_explains_what_is_missing(tmp_path, data, teacher):
    train, test = data
    with pytest.raises(FileNotFoundError, match="no model.pt"):
        api.load_trained_model(tmp_path)
    out = tmp_path / "run"
    api.distill(teacher, student, train, test, method="ce", out=str(out), **ZOO, **FAST)
    summary = results(out)
    del summary["image_shape"]
    (out / "results.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="lacks image_shape"):
        api.load_trained_model(out)
    (out / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match="not all finished"):
        api.load_trained_model(out)


def test_simkd_refuses_quality_selected_layers(tmp_path, data, teacher):
    train, test = data
    with pytest.raises(ValueError, match="does not apply to simkd"):
        api.distill(teacher, student, train, test, method="simkd", teacher_layers="auto",
                    out=str(tmp_path / "run"), **ZOO, **FAST)
    assert not (tmp_path / "run").exists()


def test_kd_settings_reach_the_method(tmp_path, data, teacher):
    train, test = data
    api.distill(teacher, student, train, test, method="kd_std", kd_weight=0.0, out=str(tmp_path), **ZOO, **FAST)
    assert all(r["loss_kd"] == 0.0 and r["loss_ce"] > 0 for r in read_metrics(tmp_path))
    config = DistillConfig.from_yaml(tmp_path / "config.yaml")
    assert (config.kd_weight, config.kd_temperature) == (0.0, None)


@pytest.mark.parametrize("values, message", [
    ({"method": "featkd", "kd_weight": 2}, "no KD term"),
    ({"method": "simkd", "kd_temperature": 2}, "no KD term"),
    ({"method": "kd", "kd_temperature": 0}, "kd_temperature must be a finite number > 0"),
    ({"method": "kd", "kd_temperature": float("inf")}, "kd_temperature must be a finite number > 0"),
    ({"method": "kd", "kd_weight": -1}, "kd_weight must be a finite number >= 0"),
])
def test_kd_settings_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig.from_dict(values).validate()
    DistillConfig.from_dict({"method": "kd_std", "kd_temperature": 3, "kd_weight": 1.5}).validate()
