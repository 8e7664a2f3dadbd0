"""benchmarks/gpu_check.py: its commands run end to end on the CPU (--quick), resume, and refuse a machine
without CUDA."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402
import report  # noqa: E402


@pytest.mark.slow
def test_quick_check_runs_every_step_and_resumes(tmp_path):
    argv = ["--quick", "--device", "cpu", "--work", str(tmp_path / "work"),
            "--results", str(tmp_path / "out" / "gpu")]
    results = tmp_path / "out" / "gpu" / "gpu_check.json"
    # a first call that runs ce only (and the teacher, which every step reads)
    assert gpu_check.main([*argv, "--steps", "ce"]) == 0
    first = json.loads(results.read_text())
    assert list(first["calls"][0]["steps"]) == ["teacher", "ce"] and not first["complete"]
    text = "\n".join(report.section_gpu(tmp_path / "out"))
    assert "**Incomplete or failed.** Not finished by any call yet: cuda_cached, " in text
    # the next call's machine keeps no files: it trains its own teacher and runs every step but ce
    shutil.rmtree(tmp_path / "work")
    assert gpu_check.main(argv) == 0
    data = json.loads(results.read_text())
    expected = {"teacher", "cuda_cached", "cuda_online", "cuda_torchrun", "cuda_quality", *gpu_check.GRID_METHODS}
    assert data["complete"] and len(data["calls"]) == 2 and set(data["planned"]) == expected
    steps = data["calls"][1]["steps"]
    assert set(steps) == expected - {"ce"} and "wall_s" in steps["teacher"]  # trained again, not reused
    quality = steps.pop("cuda_quality")
    assert quality["command"].startswith("featkd quality --checkpoint ")
    assert quality["layers_measured"] == 18 and len(quality["selected"]) == 4
    for name, step in steps.items():
        assert 0.0 <= step["final_test_acc"] <= 1.0 and step["images_per_s"] > 0, name
        assert len(step["images_per_s_per_epoch"]) == 1 and step["images_per_s_per_epoch"][0] > 0, name
    assert steps["cuda_torchrun"]["command"].startswith("torchrun --nproc_per_node 1 -m featkd distill")
    assert "--teacher-mode online" in steps["cuda_online"]["command"]
    assert "--teacher-mode cache --cache-memory-mb 32768" in steps["cuda_cached"]["command"]
    assert "--select-by Q/paper" in steps["featkd"]["command"]
    assert len(steps["featkd"]["teacher_layers"]) == 4 and data["calls"][1]["online_vs_cached_images_per_s"] > 0
    # a rerun finds every step finished and leaves the file as it was
    before = results.read_text()
    assert gpu_check.main(argv) == 0 and results.read_text() == before
    # --steps runs a step again, reusing its complete run directory: nothing is trained
    assert gpu_check.main([*argv, "--steps", "kd"]) == 0
    again = json.loads(results.read_text())["calls"][2]["steps"]
    assert list(again) == ["teacher", "kd"] and all("wall_s" not in step for step in again.values())
    assert again["kd"]["final_test_acc"] == steps["kd"]["final_test_acc"]
    # BENCHMARKS.md shows each call and step
    text = "\n".join(report.section_gpu(tmp_path / "out"))
    assert "3 calls" in text and "Call 1: " in text and "Call 3: " in text and "Incomplete" not in text
    ce = next(line for line in text.splitlines() if line.startswith("| ce |"))
    ce_step = first["calls"][0]["steps"]["ce"]
    assert "`featkd distill " in ce and f"| {100 * ce_step['final_test_acc']:.2f} |" in ce
    speed = ce_step["images_per_s_per_epoch"][0]
    assert ce.endswith(f"| {speed:.0f}–{speed:.0f} |")
    assert "Online teacher / cached teacher images/s" in text


def test_other_settings_start_the_check_anew(tmp_path):
    path = tmp_path / "gpu_check.json"
    settings = {"device": "cuda", "amp": "bf16", "epochs": 5}
    call = {"command": "gpu_check.py", "machine": {}, "settings": settings,
            "steps": {"teacher": {"final_test_acc": 0.9}, "ce": {"pending": True}}}
    path.write_text(json.dumps({"benchmark": "gpu_check", "calls": [call]}))
    assert gpu_check.earlier_calls(path, settings) == [call]
    assert gpu_check.finished_steps([call]) == {"teacher"}
    assert gpu_check.earlier_calls(path, {**settings, "epochs": 10}) == []
    # a file from before calls were recorded apart holds its one call at the top level
    path.write_text(json.dumps({"benchmark": "gpu_check", **call, "complete": False}))
    assert gpu_check.earlier_calls(path, settings) == [call]


def test_unknown_step_is_refused_before_anything_runs(tmp_path, capsys):
    argv = ["--quick", "--device", "cpu", "--work", str(tmp_path / "work"),
            "--results", str(tmp_path / "out"), "--steps", "ce,no_such_step"]
    assert gpu_check.main(argv) == 2
    assert "unknown step(s) no_such_step; the steps: teacher, " in capsys.readouterr().err
    assert gpu_check.main([*argv[:-1], ","]) == 2
    assert "--steps names no step" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_a_step_run_with_another_command_is_not_finished(tmp_path):
    args = gpu_check.build_parser().parse_args(["--quick", "--device", "cpu"])
    planned = gpu_check.steps(args, tmp_path)
    assert [step.name for step in planned] == list(gpu_check.STEP_NAMES)
    commands = {step.name: step.shown() for step in planned}
    call = {"steps": {"teacher": {"command": commands["teacher"], "final_test_acc": 0.9},
                      "ce": {"command": commands["ce"].replace("--teacher-mode auto", "--teacher-mode cache"),
                             "final_test_acc": 0.8},
                      "kd": {"command": commands["kd"], "error": "exit 1"}}}
    assert gpu_check.finished_steps([call]) == {"teacher", "ce"}
    assert gpu_check.finished_steps([call], commands) == {"teacher"}
    assert [step.name for step in gpu_check.chosen_steps(planned, None, {"teacher"})] == list(gpu_check.STEP_NAMES)
    # the report lists the steps no call finished with its current command
    (tmp_path / "gpu").mkdir()
    data = {"benchmark": "gpu_check", "planned": commands, "complete": False,
            "calls": [{"command": "gpu_check.py", "machine": {}, **call}]}
    (tmp_path / "gpu" / "gpu_check.json").write_text(json.dumps(data))
    text = "\n".join(report.section_gpu(tmp_path))
    assert "Not finished by any call yet: cuda_cached, cuda_online, cuda_torchrun, cuda_quality, ce, kd, " in text


def test_data_root_reaches_every_training_command(tmp_path):
    args = gpu_check.build_parser().parse_args(["--data-root", "/data/fmnist"])
    found = gpu_check.steps(args, tmp_path)
    training = [step for step in found if step.name != "cuda_quality"]  # quality reads the teacher's run
    assert all(step.argv[step.argv.index("--data-root") + 1] == "/data/fmnist" for step in training)


def test_failed_teacher_skips_the_rest(tmp_path, monkeypatch):
    real_steps = gpu_check.steps

    def broken(args, work):
        found = real_steps(args, work)
        teacher = found[0]
        model = teacher.argv.index("--model") + 1
        argv = [*teacher.argv[:model], "no_such_model", *teacher.argv[model + 1:]]
        return [gpu_check.Step(teacher.name, argv, teacher.out), *found[1:]]

    monkeypatch.setattr(gpu_check, "steps", broken)
    argv = ["--quick", "--device", "cpu", "--work", str(tmp_path / "work"),
            "--results", str(tmp_path / "out" / "gpu")]
    assert gpu_check.main(argv) == 1
    data = json.loads((tmp_path / "out" / "gpu" / "gpu_check.json").read_text())
    steps = data["calls"][0]["steps"]
    assert not data["complete"] and "no_such_model" in steps["teacher"]["error"]
    assert steps["ce"]["error"] == "skipped: the teacher failed"
    text = "\n".join(report.section_gpu(tmp_path / "out"))
    assert "**Incomplete or failed.**" in text and "| skipped: the teacher failed |" in text
    assert "Not run yet" in "\n".join(report.section_gpu(tmp_path / "nothing"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(tmp_path, capsys):
    results = tmp_path / "out"
    assert gpu_check.main(["--results", str(results)]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--results", str(results)]) == 2
    assert "cpu only with --quick" in capsys.readouterr().err and not results.exists()


def test_report_gives_the_online_cached_ratio_of_a_check_cut_short(tmp_path):
    step = {"command": "featkd distill", "final_test_acc": 0.5}
    data = {"command": "gpu_check.py", "machine": {"cuda": "a GPU"}, "complete": False,
            "steps": {"cuda_cached": {**step, "images_per_s": 100.0},
                      "cuda_online": {**step, "images_per_s": 250.0}}}
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "gpu_check.json").write_text(json.dumps(data))
    text = "\n".join(report.section_gpu(tmp_path))
    assert "**Incomplete or failed.**" in text and "Online teacher / cached teacher images/s: 2.50." in text
    # a file from before the steps were planned in it names what is missing from the known steps
    assert "Not finished by any call yet: teacher, cuda_torchrun, cuda_quality, ce, kd, simkd, featkd, " in text


def test_a_check_cut_short_lists_the_steps_it_did_not_reach(tmp_path, monkeypatch):
    calls = []

    def stopped_after_the_teacher(step, env):
        if calls:
            raise KeyboardInterrupt  # as a timeout's kill would stop it
        calls.append(step.name)
        return {"command": step.shown(), "final_test_acc": 0.5, "images_per_s": 10.0}

    monkeypatch.setattr(gpu_check, "run_step", stopped_after_the_teacher)
    argv = ["--quick", "--device", "cpu", "--work", str(tmp_path / "work"),
            "--results", str(tmp_path / "out" / "gpu")]
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(argv)
    data = json.loads((tmp_path / "out" / "gpu" / "gpu_check.json").read_text())
    steps = data["calls"][0]["steps"]
    assert not data["complete"] and "pending" not in steps["teacher"]
    assert all(step["pending"] for name, step in steps.items() if name != "teacher")
    text = "\n".join(report.section_gpu(tmp_path / "out"))
    featkd = next(line for line in text.splitlines() if line.startswith("| featkd |"))
    assert "not reached" in featkd and "**Incomplete or failed.**" in text
