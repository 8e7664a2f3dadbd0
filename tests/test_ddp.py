"""DDP smoke test: ``torchrun --nproc_per_node=2 featkd distill`` on the CPU (gloo)."""

import json
import os
import subprocess
import sys

import yaml

from featkd.train import read_metrics


def test_two_process_distill_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "featkd", "distill", "--teacher", "resnet34", "--teacher-width", "1/16",
        "--student", "resnet9", "--student-width", "1/16", "--method", "featkd", "--teacher-layers", "auto",
        "--data", "synthetic", "--data-options", "num_classes:3,samples_per_class:8,test_per_class:4",
        "--image-size", "8", "--batch-size", "8", "--epochs", "2", "--device", "cpu", "--no-progress",
        "--out", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("results in") == 1  # only rank 0 prints
    assert done.stderr.count("epoch 2/2") == 1  # and logs epochs
    assert "find_unused_parameters" not in done.stderr  # featkd's detach leaves no parameter unused
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]  # one writer
    assert len({r["seed"] for r in records}) == 1
    results = json.loads((out / "results.json").read_text())
    assert len(results["teacher_layers"]) == 4 and (out / "quality.json").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["batch_size"] == 8
    assert (out / "model.pt").is_file()
    assert not list(out.glob(".*.tmp"))
