"""Every zoo model learns: a small fixed budget on digits, at the widths the benchmark uses.

A model that does not learn makes every benchmark row built on it meaningless (the ViT rows of
an earlier benchmark were: with a fixed 0.02 init, narrow ViT blocks start almost silent). Each
model trains from scratch for 10 epochs of 1,397 digits at 32 px (batch 32, the recipe's
optimizer and schedule, seed 0) and must reach FLOOR validation accuracy (chance: 0.10).
Measured with this budget: the old ViT init reached 0.47 (vit_et x1/8) and the width-aware
init 0.79, so the old init fails this test.

The outcome depends on the thread count (it changes the order of floating-point reductions,
and deep narrow nets amplify that): vgg19_bn x1/8, the slowest starter, reaches 0.92 with two
threads but 0.54 with one. The test pins THREADS so that OMP_NUM_THREADS or the machine's core
count cannot decide it.
"""

import sys
from pathlib import Path

import pytest
import torch

import featkd
from featkd.data import load_splits
from featkd.models import create_model, list_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402  (benchmarks/common.py: the benchmark's widths)

FLOOR = 0.6
EPOCHS = 10
THREADS = 2
BENCHMARK = common.SCALES["default"]
# Zoo models outside the benchmark, at widths of the same order.
OTHER_WIDTHS = {"resnet18": 1 / 16, "vit_t": 1 / 8, "vit_s": 1 / 16}
WIDTHS = {**BENCHMARK.teacher_widths, **BENCHMARK.student_widths, **OTHER_WIDTHS}


@pytest.fixture
def pinned_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    train, val, _ = load_splits("digits", image_size=32, val_size=200)
    return train, val


def test_every_zoo_model_has_a_width_here():
    assert sorted(WIDTHS) == list_models()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WIDTHS))
def test_zoo_model_learns_digits(name, digits, pinned_threads):
    train, val = digits
    torch.manual_seed(0)
    lr = BENCHMARK.teacher_lrs.get(name)  # the benchmark's from-scratch lr (vit_b)
    result = featkd.train_teacher(
        lambda: create_model(name, 10, in_channels=train.image_shape[0], image_size=32, width=WIDTHS[name]),
        train, val,
        model_name=name, epochs=EPOCHS, batch_size=32, eval_batch_size=256, progress=False, device="cpu",
        **({"lr": lr} if lr else {}))
    accuracy = result.runs[0].final_test_acc  # the held-out digits passed as the evaluation split
    assert accuracy >= FLOOR, f"{name} x{WIDTHS[name]:g} reached {accuracy:.3f} < {FLOOR} after {EPOCHS} epochs"
