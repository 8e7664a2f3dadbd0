"""Run directories: claimed only after setup, unstarted ones replaced, effective settings in run.json."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch
import torchvision
import yaml

from featkd.cli import main
from featkd.provenance import git_state, software_versions

DATA = ["--data", "synthetic", "--data-options", "num_classes:3,samples_per_class:6,test_per_class:2",
        "--image-size", "8", "--batch-size", "6", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", "--model", "resnet34", "--width", "1/16", "--epochs", "1", "--out", str(out),
                 *DATA]) == 0
    return out


def distill_args(teacher_dir, out, *extra):
    return ["distill", "--teacher-checkpoint", str(teacher_dir), "--student", "resnet9", "--student-width", "1/16",
            "--epochs", "1", "--out", str(out), *DATA, *extra]


def test_a_failed_setup_leaves_nothing_and_the_fixed_command_runs(teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(distill_args(teacher_dir, out, "--method", "fitnet", "--teacher-layers", "3,7,13,99")) == 2
    assert "layer index 99 out of range: resnet34" in capsys.readouterr().err and not out.exists()
    assert main(distill_args(teacher_dir, out, "--method", "fitnet", "--teacher-layers", "3,7,13,16")) == 0
    assert (out / "model.pt").is_file()


def test_an_unstarted_directory_of_another_config_is_replaced(teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # what a run that died before its first checkpoint leaves: its config, and a Q report of another teacher
    (out / "config.yaml").write_text(yaml.safe_dump({"method": "featkd", "epochs": 7, "teacher": "vgg19_bn"}))
    (out / "quality.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert main(distill_args(teacher_dir, out, "--method", "featkd", "--teacher-layers", "auto")) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["epochs"] == 1 and config["teacher"] == "resnet34"
    assert json.loads((out / "quality.json").read_text())["model"] == "resnet34"  # measured anew
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1]


def test_a_started_directory_of_another_config_is_still_refused(teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(distill_args(teacher_dir, out, "--method", "ce", "stop_after_epochs=1", "--epochs", "2")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(distill_args(teacher_dir, out, "--method", "kd")) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config (epochs: 2 -> 1; method: 'ce' -> 'kd')" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (out / "config.yaml").unlink()  # its checkpoint alone cannot say what it was trained with
    del before["config.yaml"]
    assert main(distill_args(teacher_dir, out, "--method", "ce", "--epochs", "2", "--lr", "0.5")) == 2
    assert "holds a started run (checkpoint, weights or results) but no config.yaml" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_run_json_records_the_effective_settings(teacher_dir, tmp_path):
    out = tmp_path / "run"
    assert main(distill_args(teacher_dir, out, "--method", "featkd", "--teacher-layers", "auto")) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["lr"] is None and config["teacher_layers"] == "auto"  # as given
    record = json.loads((out / "run.json").read_text())
    from featkd.selection import resolve_rule

    quality = json.loads((out / "quality.json").read_text())
    selected = quality["selected"][resolve_rule(None).in_variant(quality["variant"]).name]
    assert record["lr"] == 0.0075  # the resnet family's one-cycle peak
    assert record["teacher_layers"] == selected and record["student_layers"] == [1, 2, 3, 4]
    assert record["student_layer_names"] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert len(record["teacher_layer_names"]) == 4
    assert record["widths"] == {"teacher_width": 0.0625, "student_width": 0.0625}
    assert record["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert record["versions"]["torchvision"].split("+")[0] == torchvision.__version__.split("+")[0]
    assert record["versions"]["featkd"] and record["world_size"] == 1 and record["device"] == "cpu"
    assert record["git_commit"] == git_state()[0]

    teacher = json.loads((teacher_dir / "run.json").read_text())
    assert teacher["lr"] == 0.0075 and teacher["widths"] == {"width": 0.0625} and "teacher_layers" not in teacher


def test_versions_name_the_installed_packages():
    versions = software_versions()
    assert set(versions) == {"featkd", "torch", "torchvision", "python"}
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_state_of_a_checkout(tmp_path):
    assert git_state(tmp_path) == (None, None)  # not a checkout
    (tmp_path / "src" / "featkd").mkdir(parents=True)
    (tmp_path / "src" / "featkd" / "a.py").write_text("x = 1\n")

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "first")
    commit, dirty = git_state(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", commit) and dirty is False
    (tmp_path / "src" / "featkd" / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == (commit, True)


def test_more_runs_add_seeds_and_keep_the_finished_ones(teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(distill_args(teacher_dir, out, "--method", "kd", "--runs", "2")) == 0
    kept = {seed: (out / f"run-{seed}" / "model.pt").read_bytes() for seed in (0, 1)}
    first = json.loads((out / "results.json").read_text())["runs"]
    assert main(distill_args(teacher_dir, out, "--method", "kd", "--runs", "3")) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["seed"] for r in runs] == [0, 1, 2] and runs[:2] == first  # seeds 0 and 1 loaded, not retrained
    assert {seed: (out / f"run-{seed}" / "model.pt").read_bytes() for seed in (0, 1)} == kept
    assert yaml.safe_load((out / "config.yaml").read_text())["runs"] == 3
    # fewer runs, or a single run's directory (laid out without run-<seed> folders), are other configs
    assert main(distill_args(teacher_dir, out, "--method", "kd", "--runs", "2")) == 2
    assert "runs: 3 -> 2" in capsys.readouterr().err
    single = tmp_path / "single"
    assert main(distill_args(teacher_dir, single, "--method", "kd")) == 0
    assert main(distill_args(teacher_dir, single, "--method", "kd", "--runs", "2")) == 2
    assert "runs: 1 -> 2" in capsys.readouterr().err


def test_a_failed_command_keeps_the_quality_files_already_in_its_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quality", "--model", "resnet9", "--width", "1/16", "--out", str(out), *DATA]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "quality.json" in before
    assert main(["train-teacher", "--model", "resnet9", "--width", "1/16", "--out", str(out),
                 "--data", "cifar10", "--data-root", str(tmp_path / "no-such")]) == 2
    assert "cifar10" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_failure_before_any_progress_leaves_the_output_as_it_was_found(tmp_path):
    from featkd.train import output_untouched_on_error

    def fail_after_writing(out):
        with pytest.raises(ValueError, match="late"), output_untouched_on_error(out):
            (out / "run-0").mkdir(parents=True, exist_ok=True)
            for name in ("config.yaml", "run.json", "quality.json", "run-0/metrics.jsonl"):
                (out / name).write_text("x")
            raise ValueError("late")

    nested = tmp_path / "new" / "deeper" / "out"
    fail_after_writing(nested)
    assert list(tmp_path.iterdir()) == []                    # every folder it created is gone

    existing = tmp_path / "existing"
    (existing / "notes").mkdir(parents=True)
    fail_after_writing(existing)
    assert sorted(p.name for p in existing.iterdir()) == ["notes"]   # the user's folder and files stay

    earlier = tmp_path / "earlier"          # files of the same names it found there are put back
    (earlier / "run-0").mkdir(parents=True)
    kept = {"quality.json": '{"layers": []}', "config.yaml": "model: mine\n", "run-0/metrics.jsonl": "{}\n"}
    for name, text in kept.items():
        (earlier / name).write_text(text)
    fail_after_writing(earlier)
    assert {name: (earlier / name).read_text() for name in kept} == kept
    assert not (earlier / "run.json").exists()

    started = tmp_path / "started"
    (started / "run-0").mkdir(parents=True)
    (started / "run-0" / "checkpoint.pt").write_text("progress")
    fail_after_writing(started)
    assert (started / "config.yaml").is_file() and (started / "run-0" / "metrics.jsonl").is_file()


def test_a_resume_with_other_teacher_weights_is_refused_and_old_directories_still_resume(teacher_dir, tmp_path,
                                                                                       capsys):
    from featkd.checkpoint import load_tensors, weights_digest
    from featkd.models import create_model

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    out = tmp_path / "run"
    args = distill_args(teacher, out, "--method", "kd", "--epochs", "2", "stop_after_epochs=1")
    assert main(args) == 0
    model = create_model("resnet34", 3, in_channels=3, image_size=8, width=1 / 16)
    model.load_state_dict(load_tensors(teacher / "model.pt"))
    recorded = yaml.safe_load((out / "config.yaml").read_text())["teacher_sha256"]
    assert recorded == weights_digest(model)
    original = (teacher / "model.pt").read_bytes()
    state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, teacher / "model.pt")  # the teacher retrained in place
    capsys.readouterr()
    assert main(args) == 2
    assert "teacher_sha256: " in capsys.readouterr().err and len(json.loads("[" + ",".join(
        (out / "metrics.jsonl").read_text().splitlines()) + "]")) == 1  # nothing trained
    (teacher / "model.pt").write_bytes(original)
    config = yaml.safe_load((out / "config.yaml").read_text())
    del config["teacher_sha256"]  # a directory written before featkd recorded the teacher
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(args[:-1]) == 0 and (out / "model.pt").is_file()
    pinned = tmp_path / "pinned"
    assert main(distill_args(teacher, pinned, "--method", "kd", "teacher_sha256=" + "0" * 64)) == 2
    assert f"not the teacher_sha256 {'0' * 64} the config pins" in capsys.readouterr().err
    assert not pinned.exists()


def test_run_json_keeps_the_software_of_earlier_calls_of_a_resumed_run(teacher_dir, tmp_path):
    out = tmp_path / "run"
    args = distill_args(teacher_dir, out, "--method", "kd", "--epochs", "3")
    assert main([*args, "stop_after_epochs=1"]) == 0
    first = json.loads((out / "run.json").read_text())
    assert "earlier_calls" not in first
    assert main([*args, "stop_after_epochs=1"]) == 0  # the same software: nothing to add
    assert "earlier_calls" not in json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({k: v for k, v in first.items() if k != "execution"}))
    assert main([*args, "stop_after_epochs=1"]) == 0  # an older featkd's record, the same in what it holds
    assert "earlier_calls" not in json.loads((out / "run.json").read_text())
    older = {**first, "git_commit": "0" * 40, "versions": {**first["versions"], "torch": "2.0.0"}}
    (out / "run.json").write_text(json.dumps(older))  # as if the first epochs ran under other software
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["earlier_calls"] == [{k: older[k] for k in ("versions", "git_commit", "git_dirty", "device",
                                                              "world_size", "execution")}]
    assert record["git_commit"] == first["git_commit"] and record["versions"] == first["versions"]


def test_a_teacher_without_checkpoint_is_the_same_on_every_call_so_the_run_resumes(tmp_path, capsys):
    """Its weights come from the run's seed, not from the process's random state."""
    import torch

    def args(out, *extra):
        return ["distill", "--teacher", "resnet34", "--teacher-width", "1/16", "--student", "resnet9",
                "--student-width", "1/16", "--method", "kd", "--epochs", "2", "--out", str(out), *DATA, *extra]

    assert main(args(tmp_path / "a", "stop_after_epochs=1")) == 0
    torch.manual_seed(1234)  # another process state
    assert main(args(tmp_path / "a")) == 0, capsys.readouterr().err  # the digest matches: it resumes
    assert main(args(tmp_path / "b")) == 0
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()


def test_run_json_records_a_resume_that_switches_the_memory_format(teacher_dir, tmp_path):
    """channels_last changes float rounding, not what is computed: a resume may switch it, and run.json
    keeps the option each call ran with."""
    out = tmp_path / "run"
    args = distill_args(teacher_dir, out, "--method", "kd", "--epochs", "2")
    assert main([*args, "stop_after_epochs=1"]) == 0
    assert json.loads((out / "run.json").read_text())["execution"] == {"channels_last": True, "compile": False}
    assert main([*args, "channels_last=false"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["execution"] == {"channels_last": False, "compile": False}
    assert [call["execution"] for call in record["earlier_calls"]] == [{"channels_last": True, "compile": False}]


def test_a_directory_another_process_trains_in_is_refused(teacher_dir, tmp_path, capsys):
    import fcntl
    import os

    out = tmp_path / "run"
    out.mkdir()
    other = os.open(out, os.O_RDONLY)  # another process's hold, as featkd takes it
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert main(distill_args(teacher_dir, out, "--method", "ce")) == 2
        assert "is in use: another featkd process is training there" in capsys.readouterr().err
        assert not any(out.iterdir())  # nothing written
        from featkd import api
        from featkd.data import get_datasets
        from featkd.models import create_model

        train, test = get_datasets("synthetic", num_classes=3, samples_per_class=4, image_size=8)
        with pytest.raises(ValueError, match="is in use"):  # the API refuses before writing too
            api.train_teacher(lambda: create_model("resnet9", 3, 3, 8, 1 / 16), train, test, epochs=1,
                              lr=1e-3, out=str(out), progress=False, device="cpu")
        assert not any(out.iterdir())
    finally:
        os.close(other)
    assert main(distill_args(teacher_dir, out, "--method", "ce")) == 0  # free again
