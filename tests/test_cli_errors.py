"""Bad invocations of every command: exit status 2, one line on stderr, nothing written to --out.

The files the invocations point at (damaged checkpoints, damaged data folders)
are written once per module into a shared folder.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from featkd.cli import join_negative_values, main
from featkd.cli.common import out_of_memory_message
from featkd.models import create_model

DATA = ["--data", "synthetic", "--data-options", "num_classes:3,samples_per_class:6,test_per_class:2",
        "--image-size", "8", "--batch-size", "6", "--no-progress", "--device", "cpu", "--epochs", "1"]
NO_OPTIONS = ["--data-options", "{}"]  # the synthetic options do not fit other datasets
TEACHER = ["train-teacher", "--model", "resnet9", "--width", "1/16", *DATA]
DISTILL = ["distill", "--teacher", "resnet34", "--teacher-width", "1/16", "--student", "resnet9",
           "--student-width", "1/16", *DATA]
QUALITY = ["quality", "--model", "resnet9", "--width", "0.0625", "--data", "synthetic", "--device", "cpu"]


BAD_YAML = {"bool_epochs": "epochs: true\n", "bool_lr": "lr: false\n", "empty_layers": "teacher_layers: []\n",
            "list_data": "data: [1]\n", "number_options": "data_options: 5\n"}


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, 3, in_channels=3, image_size=8, width=1 / 16)


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Damaged checkpoints and data folders, one of each kind."""
    root = tmp_path_factory.mktemp("bad_inputs")
    torch.save(_model("resnet34").state_dict(), root / "resnet34.pt")
    good = (root / "resnet34.pt").read_bytes()
    (root / "empty.pt").write_bytes(b"")
    (root / "truncated.pt").write_bytes(good[: len(good) // 2])
    (root / "corrupt.pt").write_bytes(bytes(range(256)) * 4)
    torch.save(_model("resnet34"), root / "full_model.pt")
    torch.save({"w": RunsCode()}, root / "runs_code.pt")
    torch.save(_model("resnet18").state_dict(), root / "resnet18.pt")
    (root / "corrupt.safetensors").write_bytes(b"\xff" * 64)
    for split in ("train", "test"):
        for name in ("a", "b"):
            _png(root / "truncated_png" / split / name / "0.png")
            _png(root / "empty_class" / split / name / "0.png")
            _png(root / "empty_test" / "train" / name / f"{split}.png")
    (root / "empty_test" / "test").mkdir()
    png = (root / "truncated_png" / "train" / "b" / "0.png").read_bytes()
    (root / "truncated_png" / "train" / "b" / "0.png").write_bytes(png[: len(png) // 2])
    (root / "empty_class" / "train" / "c").mkdir()
    (root / "bad.yaml").write_text("epochs: [1, 2\n")
    (root / "demo_types.yaml").write_text("teacher_width: wide\n")
    for name, text in BAD_YAML.items():
        (root / f"{name}.yaml").write_text(text)
    cifar = root / "cifar" / "cifar-100-python"
    cifar.mkdir(parents=True)
    with open(cifar / "test", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "fine_labels": [0]}, f)
    with open(cifar / "train", "wb") as f:
        pickle.dump({"data": RunsCode(), "fine_labels": [0]}, f)
    return root


# (arguments, part of the message); "{files}" is the folder of the damaged files.
BAD = [
    # train-teacher
    ([*TEACHER, "--model", "resnet7"], "unknown model 'resnet7'; known:"),
    ([*TEACHER, "--width", "wide"], "width must be a number"),
    ([*TEACHER, "epochs=-1"], "epochs must be >= 1"),
    ([*TEACHER, "--epochs", "-2"], "epochs must be >= 1"),
    ([*TEACHER, "--epochs", "x"], "epochs must be an integer, got 'x'"),
    ([*TEACHER, "colour=red"], "unknown option 'colour'"),
    (["train-teacher", *DATA], "give --model NAME (known: mobilenetv2, resnet18"),
    ([*TEACHER, "--data", "mnist9"], "unknown dataset 'mnist9'"),
    ([*TEACHER, "--config", "/no/such.yaml"], "config file not found: /no/such.yaml"),
    ([*TEACHER, "--optimizer", "lion"], "optimizer must be one of adamw, sgd"),
    ([*TEACHER, "--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
    ([*TEACHER, "--lr", "inf"], "lr must be a finite number > 0, got inf"),
    ([*TEACHER, "--weight-decay", "nan"], "weight_decay must be a finite number >= 0, got nan"),
    ([*TEACHER, "--lr-gamma", "-1"], "lr_gamma must be a finite number > 0, got -1.0"),
    ([*TEACHER, "--width", "inf"], "width must be a finite number > 0, got inf"),
    ([*TEACHER, "--data-seed", "-1"], "data_seed must be >= 0, got -1"),
    ([*TEACHER, "--batch-size", "0"], "batch_size must be >= 1"),
    ([*TEACHER, "--milestones", "5,3"], "milestones must be increasing"),
    ([*TEACHER, "--device", "tpu"], "device must be auto, cpu, cuda or cuda:N"),
    ([*TEACHER, "--seed", "-1"], "seed must be >= 0, got -1"),
    ([*TEACHER, "--amp", "fp8"], "amp must be one of auto, bf16, none"),
    ([*TEACHER, "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    ([*TEACHER, "--data-options", "colour:red"],
     "unknown option(s) ['colour'] for dataset 'synthetic'; valid: ['in_channels', 'noise', 'num_classes', "
     "'samples_per_class', 'test_per_class']"),  # not seed, train_limit, ...: those are refused as data options
    ([*TEACHER, "--init-checkpoint", "{files}/empty.pt"], "empty.pt is empty (0 bytes)"),
    ([*TEACHER, "--init-checkpoint", "{files}/resnet18.pt"], "does not fit resnet9: "),
    ([*TEACHER, "--data", "imagefolder", "--data-root", "{files}/truncated_png", *NO_OPTIONS],
     "truncated_png/train/b/0.png: cannot decode image"),
    ([*TEACHER, "--data", "imagefolder", "--data-root", "{files}/empty_class", *NO_OPTIONS],
     "empty_class/train/c: class folder holds no images"),
    ([*TEACHER, "--data", "cifar100", "--data-root", "{files}/cifar", *NO_OPTIONS],
     "train: refused to unpickle posix.system"),
    ([*TEACHER, "--data", "fashion_mnist", "--data-root", "/no/such/dir", *NO_OPTIONS],
     "Fashion-MNIST IDX files not found"),
    ([*TEACHER, "--data", "imagefolder", "--data-root", "{files}/empty_test", *NO_OPTIONS],
     "dataset 'imagefolder' in {files}/empty_test has no test images"),
    ([*TEACHER, "--data-options", "seed:3"], "data options ['seed'] are not dataset options: use --data-seed"),
    ([*TEACHER, "--data-options", "name:cifar10"], "data options ['name'] are not dataset options: use --data"),
    ([*TEACHER, "--data-options", "num_classes:abc"], "dataset 'synthetic': option num_classes must be int, got 'abc'"),
    ([*TEACHER, "--data-options", "num_classes:3,samples_per_class:-1"], "samples_per_class=-1: must be at least 1"),
    ([*TEACHER, "--data", "digits", "--data-options", "test_fraction:0"], "test_fraction must be between 0 and 1"),
    # distill
    ([*DISTILL, "--method", "magic"], "unknown method 'magic'"),
    (["distill", "--student", "resnet9", *DATA], "no teacher model"),
    (["distill", "--teacher", "resnet34", *DATA], "no student model"),
    ([*DISTILL, "--teacher", "resnet35"], "unknown teacher model 'resnet35'"),
    ([*DISTILL, "--method", "fitnet", "--teacher-layers", "best"], "no module named 'best' in resnet34;"),
    ([*DISTILL, "--method", "fitnet", "--teacher-layers", "-30,2,3,4"],
     "layer index -30 out of range: resnet34 has 18 generalized layers"),
    ([*DISTILL, "--method", "fitnet", "--student-layers", "1,2,3,99"],
     "student layers: layer index 99 out of range: resnet9 has 6"),
    ([*DISTILL, "--method", "fitnet", "--teacher-layers", "3,7"], "method 'fitnet' pairs layers one-to-one"),
    ([*DISTILL, "--teacher-checkpoint", "/no/such/dir"], "checkpoint not found: /no/such/dir"),
    ([*DISTILL, "--teacher-checkpoint", "{files}/empty.pt"], "empty.pt is empty (0 bytes)"),
    ([*DISTILL, "--teacher-checkpoint", "{files}/truncated.pt"], "truncated.pt is not a readable torch file"),
    ([*DISTILL, "--teacher-checkpoint", "{files}/corrupt.pt"], "corrupt.pt is not a readable torch file"),
    ([*DISTILL, "--teacher-checkpoint", "{files}/full_model.pt"],
     "full_model.pt holds pickled Python objects (torch.nn.modules"),
    ([*DISTILL, "--teacher-checkpoint", "{files}/runs_code.pt"], "holds pickled Python objects (posix.system)"),
    ([*DISTILL, "--teacher-checkpoint", "{files}/resnet18.pt"], "resnet18.pt does not fit resnet34: "),
    ([*DISTILL, "--teacher-checkpoint", "{files}/corrupt.safetensors"], "is not a readable safetensors file"),
    ([*DISTILL, "--augment", "--teacher-mode", "cache"], "teacher_mode=cache needs augment=false"),
    ([*DISTILL, "--quality-variant", "best"], "quality_variant must be one of paper, corrected"),
    ([*DISTILL, "--seed", "-1"], "seed must be >= 0, got -1"),
    # found only once the directory is claimed: what was written is removed again
    ([*DISTILL, "--method", "semckd", "--train-limit", "4"], "smaller than one batch of 6"),
    ([*DISTILL, "--method", "featkd", "--quality-subset", "3"], "every class needs at least 2 samples"),
    # quality
    ([*QUALITY, "--checkpoint", "{files}/empty.pt"], "empty.pt is empty (0 bytes)"),
    ([*QUALITY, "--checkpoint", "{files}/runs_code.pt"], "posix.system"),
    ([*QUALITY, "--checkpoint", "{files}/resnet18.pt"], "does not fit resnet9: "),
    ([*QUALITY, "--layers", "1,9"], "valid indices 0..5"),
    ([*QUALITY, "--layers", "-9"], "layer index -9 out of range: resnet9 has 6"),
    ([*QUALITY, "--variant", "best"], "argument --variant: invalid choice: 'best'"),
    ([*QUALITY, "--width", "1/x"], "--width must be a number (or a fraction like 1/8), got '1/x'"),
    ([*QUALITY, "--k", "0"], "--k must be at least 1"),
    ([*QUALITY, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ([*QUALITY, "--subset-size", "0"], "--subset-size must be at least 1, got 0"),
    ([*QUALITY, "--memory-gb", "0"], "--memory-gb must be a positive number, got 0.0"),
    ([*QUALITY, "--memory-gb", "inf"], "--memory-gb must be a positive number, got inf"),
    ([*QUALITY, "--memory-gb", "0.000001"], "memory_budget of 536 bytes is too small"),
    ([*QUALITY, "--data-options", "train_limit:10"],
     "data options ['train_limit'] are not dataset options: use --train-limit"),
    ([*QUALITY, "--device", "tpu"], "device must be auto, cpu, cuda or cuda:N; got 'tpu'"),
    *([([*QUALITY, "--device", "cuda"], "device 'cuda' asked for but CUDA is not available")]
      if not torch.cuda.is_available() else []),
    (["quality", "--data", "synthetic"], "give --model (or a train-teacher run directory as --checkpoint)"),
    # demo
    (["demo", "--quick", "--methods", "featkd,magic"], "unknown method(s) ['magic']"),
    (["demo", "--quick", "--epochs", "0"], "epochs and teacher epochs must be >= 1"),
    ([*DISTILL, "--teacher-layers", "paper"], "teacher_layers: 'paper' is a keyword of the other model's layers"),
    ([*DISTILL, "--student-layers", "auto"], "student_layers takes paper or a list of GL indices"),
    (["train-teacher", "--model", "torchvision:alexnet", *DATA],
     "the model (AlexNet) fails on a sample batch of shape (2, 3, 8, 8)"),
    (["train-teacher", "--model", "torchvision:resnet18:num_classes=5", *DATA],
     "the model outputs shape (2, 5) in eval mode, expected logits (2, 3) for the data's 3 classes"),
    (["distill", "--teacher", "resnet34", "--teacher-width", "1/16", "--student",
      "torchvision:resnet18:num_classes=5", *DATA], "the student outputs shape (2, 5)"),
    ([*QUALITY, "--model", "torchvision:resnet18:num_classes=5", "--width", "1"],
     "the model outputs shape (2, 5) in eval mode, expected logits (2, 10)"),
    (["demo", "--quick", "--config", "{files}/bad.yaml"], "bad.yaml is not valid YAML"),
    (["demo", "--quick", "--config", "{files}/demo_types.yaml"], "teacher_width must be a number"),
    # values of the wrong kind, from options, key=value overrides and config files
    ([*TEACHER, "momentum=1"], "momentum must be in [0, 1), got 1.0"),
    ([*TEACHER, "epochs=2.5"], "epochs must be an integer, got '2.5'"),
    ([*TEACHER, "data_options=[1,2]"], "data_options must look like name:value,name:value"),
    *[([*DISTILL, "--config", f"{{files}}/{name}.yaml"], message) for name, message in (
        ("bool_epochs", "epochs must be an integer, got True"), ("bool_lr", "lr must be a number, got False"),
        ("empty_layers", "teacher_layers is an empty list"), ("list_data", "data must be text, got [1]"),
        ("number_options", "data_options must be a mapping of name: value, got 5"))],
]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args, message", BAD, ids=[f"{i:02d}-{args[0]}" for i, (args, _) in enumerate(BAD)])
def test_bad_invocation_exits_2_with_one_line_and_writes_nothing(args, message, files, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = [a.replace("{files}", str(files)) for a in args] + ["--out", str(out)]
    code, _, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    message = message.replace("{files}", str(files))
    assert lines[0].startswith("featkd") and ": error: " in lines[0] and message in lines[0], lines[0]
    assert "Traceback" not in err and "weights_only" not in err
    assert not out.exists() and not (tmp_path / "pwned").exists()


def test_there_are_at_least_30_bad_invocations():
    assert len(BAD) >= 30


def test_missing_out_is_refused(capsys):
    code, _, err = run([*DISTILL, "out=none"], capsys)
    assert code == 2 and "give --out DIR" in err and len(err.strip().splitlines()) == 1


def test_negative_values_may_follow_an_option():
    assert join_negative_values(["--teacher-layers", "-1,2", "--lr", "-0.5", "-v"]) == [
        "--teacher-layers=-1,2", "--lr=-0.5", "-v"]
    assert join_negative_values(["--teacher-layers=3", "-1"]) == ["--teacher-layers=3", "-1"]


def test_help_lists_the_names_instead_of_a_function(capsys):
    code, out, _ = run(["distill", "--help"], capsys)
    assert code == 0 and "list_methods()" not in out and "list_models()" not in out
    assert "featkd_ce_kd" in " ".join(out.split()) and "resnet34" in out


def test_a_real_process_ends_with_the_one_line_and_no_traceback(files, tmp_path):
    """Outside pytest's capture: the error is the last line of stderr, and no traceback precedes it."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "featkd", *DISTILL, "--teacher-checkpoint", str(files / "truncated.pt"),
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"featkd distill: error: checkpoint {files / 'truncated.pt'} is not a readable torch file (corrupt, "
        "truncated, or not written by torch.save); featkd reads .pt/.pth state dicts and .safetensors files")
    assert not out.exists()


def test_an_allocation_beyond_any_memory_ends_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    big = ["--image-size", "10000000"]  # 3 x 10^14 values per image: more than any address space
    code, _, err = run([*TEACHER, *big, "--out", str(out)], capsys)
    assert code == 1 and err.strip().splitlines() == [
        "featkd train-teacher: error: out of host memory: tried to allocate 3274.2 TiB; "
        "lower --batch-size, --eval-batch-size or --image-size"]
    assert not out.exists()


def test_device_allocation_failures_are_named_and_other_errors_are_not():
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                  "capacity of 79.15 GiB of which 1.20 GiB is free.")
    assert out_of_memory_message(cuda, "quality") == (
        "out of CUDA memory: tried to allocate 2.00 GiB; lower --subset-size, --batch-size or --image-size")
    mps = RuntimeError("MPS backend out of memory (MPS allocated: 9.00 GB). Tried to allocate 256 bytes.")
    assert out_of_memory_message(mps, "distill").startswith("out of MPS backend memory: tried to allocate 256 bytes;")
    assert out_of_memory_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "distill") is None


def test_a_runtime_error_that_is_not_an_allocation_keeps_its_traceback(monkeypatch, tmp_path):
    def fails(args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr("featkd.cli.report.run", fails)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(["report", str(tmp_path)])


# --------------------------------------------------------------------------- checkpoint formats
def _write(fmt: str, path: Path, state: dict[str, torch.Tensor]) -> None:
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "lightning":
        torch.save({"epoch": 1, "state_dict": {f"model.{k}": v for k, v in state.items()},
                    "hyper_parameters": {"lr": 0.1}}, path)
    elif fmt == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save(state, path)


def _quality_layers(checkpoint: Path, out: Path, capsys) -> list:
    code, _, err = run([*QUALITY, "--layers", "2,4", "--checkpoint", str(checkpoint), "--out", str(out),
                        "--subset-size", "100"], capsys)
    assert code == 0, err
    return json.loads((out / "quality.json").read_text())["layers"]


@pytest.mark.parametrize("fmt, name", [("pth", "w.pth"), ("safetensors", "w.safetensors"),
                                       ("lightning", "last.ckpt"), ("ddp", "ddp.pt")])
def test_quality_reads_every_checkpoint_format(fmt, name, tmp_path, capsys):
    """The same weights saved as a plain state dict and in ``fmt`` give the same quality numbers."""
    torch.manual_seed(3)
    state = create_model("resnet9", 10, in_channels=3, image_size=32, width=0.0625).state_dict()
    _write("pt", tmp_path / "plain.pt", state)
    _write(fmt, tmp_path / name, state)
    assert _quality_layers(tmp_path / name, tmp_path / "a", capsys) == _quality_layers(
        tmp_path / "plain.pt", tmp_path / "b", capsys)


def test_ctrl_c_ends_in_one_line_with_status_130(monkeypatch, tmp_path, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("featkd.cli.report.run", interrupted)
    assert main(["report", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["featkd report: interrupted"]
    monkeypatch.setattr("featkd.cli.train.run_distill", interrupted)
    assert main([*DISTILL, "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "featkd distill: interrupted; the last checkpoint is kept (rerun the same command to resume)"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError, OSError])
def test_debug_lets_the_error_through_with_its_traceback(error, monkeypatch, tmp_path, capsys):
    def failing(args):
        raise error("in the command")

    monkeypatch.setattr("featkd.cli.report.run", failing)
    with pytest.raises(error, match="in the command"):
        main(["--debug", "report", str(tmp_path)])
    assert capsys.readouterr().err == ""
    assert main(["report", str(tmp_path)]) == (130 if error is KeyboardInterrupt else 2)  # without it: one line
