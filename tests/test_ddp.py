"""DDP smoke test: ``torchrun --nproc_per_node=2 featkd distill`` on the CPU (gloo)."""

import json
import os
import re
import subprocess
import sys

import torch
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


def torchrun(args, cwd, timeout=180):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def test_two_processes_train_like_one_on_the_same_global_batch(tmp_path):
    """DDP splits each global batch of 8 into two halves and averages their gradients: same steps as one process.

    vit_et has no BatchNorm (whose per-process statistics would differ); SGD keeps the update linear
    in the gradient, so the only difference is float rounding.
    """
    from featkd.checkpoint import load_tensors
    from featkd.cli import main
    from featkd.models import create_model

    args = ["train-teacher", "--model", "vit_et", "--width", "1/16", "--optimizer", "sgd", "--lr", "0.05",
            "--data", "synthetic", "--data-options", "num_classes:3,samples_per_class:8,test_per_class:2",
            "--image-size", "8", "--batch-size", "8", "--epochs", "2", "--device", "cpu", "--no-progress"]
    done = torchrun(["-m", "featkd", *args, "--out", str(tmp_path / "two")], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = load_tensors(tmp_path / "two" / "model.pt"), load_tensors(tmp_path / "one" / "model.pt")
    torch.manual_seed(0)
    initial = create_model("vit_et", 3, in_channels=3, image_size=8, width=1 / 16).state_dict()
    assert two.keys() == one.keys()
    moved = max(float((one[k] - initial[k]).abs().max()) for k in one)
    differ = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert moved > 1e-3 and differ < 1e-5, (moved, differ)  # 6 steps changed the weights, identically
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2


NAN_SCRIPT = '''
import sys

import torch.distributed as dist
from torch import nn

import featkd
from featkd.data import get_datasets
from featkd.train import finish_distributed, init_distributed


class NanOnRankOne(nn.Module):
    """A linear classifier whose logits turn NaN on rank 1 from its third training forward on."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
        self.calls = 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if dist.get_rank() == 1 and self.calls >= 3:
                out = out * float("nan")
        return out


train, test = get_datasets("synthetic", num_classes=3, samples_per_class=8, test_per_class=2, image_size=8)
context = init_distributed("cpu")
code = 0
try:
    featkd.train_teacher(NanOnRankOne(), train, test, epochs=3, batch_size=8, lr=0.01, device="cpu",
                         progress=False, out=sys.argv[1], context=context)
except FloatingPointError as err:
    print(f"rank {context.rank} stopped: {err}", flush=True)
    code = 3
finally:
    finish_distributed()
sys.exit(code)
'''


def test_a_nan_on_one_process_stops_every_process_with_the_same_message(tmp_path):
    script = tmp_path / "nan_on_rank_one.py"
    script.write_text(NAN_SCRIPT)
    done = torchrun([str(script), str(tmp_path / "out")], tmp_path, timeout=120)  # a hang would time out
    assert done.returncode != 0
    # the two ranks print at the same moment: their lines may run together, so split on the markers
    parts = re.split(r"(rank \d) stopped: ", done.stdout)
    stops = sorted((rank, text.splitlines()[0]) for rank, text in zip(parts[1::2], parts[2::2]))
    assert [rank for rank, _ in stops] == ["rank 0", "rank 1"], done.stdout + done.stderr[-3000:]
    message = stops[0][1]
    assert stops[1][1] == message
    assert message.startswith("loss 'ce' is nan on 1 of 2 processes at step 2 (epoch 1, seed 0)"), message


FINISH_SCRIPT = '''
import sys
import time
from pathlib import Path

import torch.distributed as dist

from featkd.train import finish_distributed

dist.init_process_group("gloo")
marker = Path(sys.argv[1])
if dist.get_rank() == 1:
    time.sleep(1.0)  # still busy when rank 0 finishes
    marker.write_text("rank 1 was still working")
finish_distributed(wait_for_peers=True)
if not marker.exists():
    sys.exit("rank 0 left the group before rank 1 arrived")
finish_distributed(wait_for_peers=True)  # once left, a no-op
'''


def test_finishing_with_wait_for_peers_leaves_the_group_together(tmp_path):
    script = tmp_path / "finish.py"
    script.write_text(FINISH_SCRIPT)
    done = torchrun([str(script), str(tmp_path / "rank1_done")], tmp_path, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
