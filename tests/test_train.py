"""Trainer, configs, the Python API and reports: resume, cache vs online, NaN stop, runs, files."""

import collections
import json
import sys

import pytest
import torch
from torch import nn

import featkd.api as api
from featkd.checkpoint import load_tensors
from featkd.config import DistillConfig, TrainConfig, apply_overrides, parse_value
from featkd.data import get_datasets
from featkd.models import create_model
from featkd.report import find_runs, format_mean_std, markdown_table, write_report
from featkd.train import (
    ClassifierModel,
    _unused_parameters,
    autocast_context,
    build_optimizer,
    build_scheduler,
    default_lr,
    evaluate,
    pack_state,
    read_metrics,
    summarize,
    unpack_state,
)
from featkd.data import BatchLoader

TIMING = ("epoch_time_s", "images_per_s")
FAST = dict(batch_size=8, eval_batch_size=64, progress=False, device="cpu")


@pytest.fixture(scope="module")
def data():
    return get_datasets("synthetic", num_classes=3, samples_per_class=8, test_per_class=4, image_size=8)


@pytest.fixture(scope="module")
def teacher(data):
    torch.manual_seed(0)
    return create_model("resnet34", 3, 3, 8, 1 / 16).eval()


def student():
    return create_model("resnet9", 3, 3, 8, 1 / 16)


def dropout_net():
    """A custom (non-zoo) model with dropout, so resuming must restore the global RNG."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3))


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_distill_takes_method_and_layers_from_the_config_unless_given(data, teacher):
    from featkd.config import DistillConfig

    train, test = data
    config = DistillConfig(method="fitnet", student_layers=[1, 2], teacher_layers=[3, 7], epochs=1, lr=0.01,
                           **FAST)
    from_config = api.distill(teacher, student, train, test, config=config)
    assert from_config.extra["method"] == "fitnet" and from_config.extra["student_layers"] == [1, 2]
    given = api.distill(teacher, student, train, test, config=config, method="kd")
    assert given.extra["method"] == "kd" and given.extra["student_layers"] == []
    assert config.method == "fitnet"  # the caller's config is not changed


# ----------------------------------------------------------------------------- resume
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, data):
    train, test = data
    options = dict(epochs=3, lr=0.01, optimizer="sgd", milestones=[1, 2], **FAST)
    full = api.train_teacher(dropout_net, train, test, out=str(tmp_path / "full"), **options)
    assert full.finished and len(full.runs[0].history) == 3

    out = str(tmp_path / "cut")
    part = api.train_teacher(dropout_net, train, test, out=out, stop_after_epochs=1, **options)
    assert not part.finished and len(part.runs[0].history) == 1
    assert not (tmp_path / "cut" / "model.pt").exists()

    def crash(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt("simulated crash after epoch 2")

    with pytest.raises(KeyboardInterrupt):
        api.train_teacher(dropout_net, train, test, out=out, callbacks=[crash], **options)
    partial = tmp_path / "cut" / ".checkpoint.pt.x1y2.tmp"  # what SIGKILL during a checkpoint write leaves
    partial.write_bytes(b"half a checkpoint")
    resumed = api.train_teacher(dropout_net, train, test, out=out, **options)
    assert resumed.finished and not partial.exists()
    assert without_timing(read_metrics(tmp_path / "cut")) == without_timing(read_metrics(tmp_path / "full"))
    a, b = load_tensors(tmp_path / "full" / "model.pt"), load_tensors(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distill_resume_matches_and_checkpoint_is_tensor_only(tmp_path, data, teacher):
    train, test = data
    options = dict(method="featkd", teacher_layers=[3, 7, 13, 16], student_name="resnet9", epochs=2, **FAST)
    api.distill(teacher, student, train, test, out=str(tmp_path / "full"), **options)
    api.distill(teacher, student, train, test, out=str(tmp_path / "cut"), stop_after_epochs=1, **options)
    api.distill(teacher, student, train, test, out=str(tmp_path / "cut"), **options)
    assert without_timing(read_metrics(tmp_path / "cut")) == without_timing(read_metrics(tmp_path / "full"))
    state = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert any(k.startswith("model.method.") for k in state)  # projectors are saved with the student


def test_refuses_to_resume_with_a_different_config(tmp_path, data):
    train, test = data
    api.train_teacher(dropout_net, train, test, out=str(tmp_path), epochs=1, lr=0.01, **FAST)
    with pytest.raises(ValueError, match="different config.*epochs.*new --out"):
        api.train_teacher(dropout_net, train, test, out=str(tmp_path), epochs=2, lr=0.01, **FAST)


def test_stop_after_epochs_counts_the_epochs_of_every_run_in_the_call(tmp_path, data):
    """--stop-after-epochs N trains N epochs per command, not N per run (here 2 + 1, then the rest)."""
    train, test = data
    options = dict(epochs=2, lr=0.01, runs=2, **FAST)
    full = api.train_teacher(dropout_net, train, test, out=str(tmp_path / "full"), **options)
    out = str(tmp_path / "cut")
    part = api.train_teacher(dropout_net, train, test, out=out, stop_after_epochs=3, **options)
    assert [len(r.history) for r in part.runs] == [2, 1] and not part.finished
    spent = api.train_teacher(dropout_net, train, test, out=str(tmp_path / "two"), stop_after_epochs=2, **options)
    assert [len(r.history) for r in spent.runs] == [2, 0] and not spent.finished
    assert not (tmp_path / "two" / "run-1").exists()  # a run this call had no epochs left for is not started
    resumed = api.train_teacher(dropout_net, train, test, out=out, **options)
    assert [without_timing(r.history) for r in resumed.runs] == [without_timing(r.history) for r in full.runs]


def _rewrite_checkpoint(path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_a_damaged_or_foreign_checkpoint_is_one_clear_error(tmp_path, data):
    from featkd.checkpoint import CheckpointError

    train, test = data
    options = dict(epochs=2, lr=0.01, out=str(tmp_path), **FAST)
    api.train_teacher(dropout_net, train, test, stop_after_epochs=1, **options)
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    torch.save({"fc.weight": torch.zeros(1)}, path)  # e.g. a weights file copied over it
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint.pt is not a featkd training checkpoint"):
        api.train_teacher(dropout_net, train, test, **options)
    path.write_bytes(good)
    _rewrite_checkpoint(path, lambda state: state.pop("model.model.4.bias"))
    with pytest.raises(CheckpointError, match=r"checkpoint.pt does not fit this run .*model\.4\.bias"):
        api.train_teacher(dropout_net, train, test, **options)
    not_a_mapping = r"not a featkd training checkpoint \(TypeError: its metadata is not a mapping\)"
    for edit, message in ((lambda meta: [1, 2], not_a_mapping),
                          (lambda meta: {**meta, "format": 99}, "unknown checkpoint format 99"),
                          (lambda meta: {**meta, "epoch": 2}, r"is damaged \(its epoch history does not match")):
        path.write_bytes(good)
        _rewrite_checkpoint(path, lambda state: state.update(meta=_meta_tensor(edit(_meta_of(state)))))
        with pytest.raises((CheckpointError, ValueError), match=message):
            api.train_teacher(dropout_net, train, test, **options)
    path.write_bytes(good)
    assert api.train_teacher(dropout_net, train, test, **options).finished


def _meta_of(state):
    return json.loads(state["meta"].numpy().tobytes())


def _meta_tensor(meta):
    return torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8).clone()


def test_a_checkpoint_from_another_world_size_or_device_is_refused(tmp_path, data):
    """Processes and device type change the results and are no config field: the checkpoint records them."""
    train, test = data
    options = dict(epochs=2, lr=0.01, out=str(tmp_path), **FAST)
    api.train_teacher(dropout_net, train, test, stop_after_epochs=1, **options)
    path = tmp_path / "checkpoint.pt"

    def as_if_two_processes(state):
        meta = _meta_of(state)
        assert meta["runtime"] == {"device": "cpu", "world_size": 1}
        meta["runtime"]["world_size"] = 2
        state["meta"] = _meta_tensor(meta)

    _rewrite_checkpoint(path, as_if_two_processes)
    with pytest.raises(ValueError, match="written on cpu with 2 processes, this command runs on cpu with 1 process"):
        api.train_teacher(dropout_net, train, test, **options)
    assert len(read_metrics(tmp_path)) == 1


def test_several_runs_get_directories_and_finished_runs_are_skipped(tmp_path, data):
    train, test = data
    options = dict(epochs=1, lr=0.01, runs=2, seed=5, **FAST)
    result = api.train_teacher(dropout_net, train, test, out=str(tmp_path), **options)
    assert [r.seed for r in result.runs] == [5, 6]
    for seed in (5, 6):
        assert (tmp_path / f"run-{seed}" / "model.pt").is_file()
        assert read_metrics(tmp_path / f"run-{seed}")[0]["seed"] == seed
    summary = json.loads((tmp_path / "results.json").read_text())
    accs = [r["final_test_acc"] for r in summary["runs"]]
    assert summary["final_test_acc"]["std_ddof"] == 1
    assert summary["final_test_acc"]["mean"] == pytest.approx(sum(accs) / 2)

    calls = []
    again = api.train_teacher(dropout_net, train, test, out=str(tmp_path), callbacks=[calls.append], **options)
    assert calls == []  # nothing retrained
    assert [r.final_test_acc for r in again.runs] == accs


def test_a_seed_run_alone_is_that_seed_of_several_runs(tmp_path, data, teacher):
    """The benchmarks train each seed as its own single run; it must be that seed's run of --runs N."""
    train, test = data
    options = dict(method="featkd", teacher_layers=[3, 7, 13, 16], student_name="resnet9", epochs=2, **FAST)
    several = api.distill(teacher, student, train, test, runs=2, seed=0, out=str(tmp_path / "two"), **options)
    alone = api.distill(teacher, student, train, test, runs=1, seed=1, out=str(tmp_path / "one"), **options)
    assert without_timing(alone.runs[0].history) == without_timing(several.runs[1].history)


# ----------------------------------------------------------------------------- teacher outputs
def test_cached_and_online_teacher_give_the_same_losses(tmp_path, data, teacher):
    train, test = data
    options = dict(method="featkd_ce_kd", teacher_layers=[3, 7, 13, 16], student_name="resnet9", epochs=1, **FAST)
    cached = api.distill(teacher, student, train, test, teacher_mode="cache", **options)
    online = api.distill(teacher, student, train, test, teacher_mode="online", **options)
    a, b = cached.runs[0].history[0], online.runs[0].history[0]
    assert {"loss_ce", "loss_kd", "loss_feat"} <= set(a)
    for key in ("loss_ce", "loss_kd", "loss_feat", "train_acc", "test_acc"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_cached_and_online_teacher_agree_exactly_under_bf16_autocast(data, teacher):
    # the online teacher's outputs were bf16 under autocast, the cache's float32: sp's loss differed
    train, test = data
    options = dict(method="sp", student_name="resnet9", teacher_name="resnet34", epochs=1, amp="bf16", **FAST)
    cached = api.distill(teacher, student, train, test, teacher_mode="cache", **options)
    online = api.distill(teacher, student, train, test, teacher_mode="online", **options)
    assert cached.runs[0].history[0]["loss"] == online.runs[0].history[0]["loss"]


def test_teacher_feed_modes(data, teacher):
    train, _ = data
    from featkd.distillation import build_method

    x, _, _ = train.batch(torch.arange(2))
    net = student()
    m = build_method("kd", teacher, net, teacher_layers=None, student_layers=None, num_classes=3, sample_input=x)
    with pytest.raises(ValueError, match="un-augmented"):
        api.TeacherFeed(teacher, train.with_augment(True), "cache", torch.device("cpu"))
    assert api.TeacherFeed(teacher, train.with_augment(True), "auto", torch.device("cpu")).mode == "online"
    feed = api.TeacherFeed(teacher, train, "auto", torch.device("cpu"))
    assert feed.mode == "cache"
    feed.configure(m)
    idx = torch.tensor([3, 0, 5])
    xb, _, _ = train.batch(idx)
    out = feed(xb, idx)
    with torch.no_grad():
        expected = teacher(xb)
    assert torch.allclose(out.logits, expected, atol=1e-5)
    feed.close()
    ce_feed = api.TeacherFeed(teacher, train, "auto", torch.device("cpu"))
    ce_feed.configure(build_method("ce", teacher, net, teacher_layers=None, student_layers=None,
                                   num_classes=3, sample_input=x))
    assert ce_feed(xb, idx) is None


def test_auto_teacher_mode_runs_online_on_an_accelerator_when_the_cache_exceeds_its_budget(data, teacher,
                                                                                             monkeypatch):
    """On a GPU a memory-mapped cache is slower than the teacher itself; on the CPU it is still built.

    The meta device stands in for an accelerator (it gives shapes, and a cache build on it would fail).
    """
    import copy

    from featkd.distillation import OnlineTeacher, TeacherCache, build_method

    train, _ = data
    x, _, _ = train.batch(torch.arange(2))
    method = build_method("kd", teacher, student(), teacher_layers=None, student_layers=None, num_classes=3,
                          sample_input=x)
    needed = TeacherCache.size_bytes(OnlineTeacher(teacher, [], True)(x), len(train))
    assert needed == len(train) * 3 * 4  # float32 logits, 3 classes
    on_meta = copy.deepcopy(teacher).to("meta")
    feed = api.TeacherFeed(on_meta, train, "auto", torch.device("meta"), memory_budget_bytes=needed - 1)
    feed.configure(method)
    feed.prepare()
    assert feed.mode == "online" and feed._cache is None
    with monkeypatch.context() as patch:  # a cache that fits is built (no real build on meta)
        patch.setattr(TeacherCache, "build", staticmethod(lambda *args, **kwargs: "built"))
        feed = api.TeacherFeed(on_meta, train, "auto", torch.device("meta"), memory_budget_bytes=needed)
        feed.configure(method)
        feed.prepare()
        assert feed.mode == "cache" and feed._cache == "built"
    feed = api.TeacherFeed(teacher, train, "auto", torch.device("cpu"), memory_budget_bytes=1)
    feed.configure(method)
    feed.prepare()
    assert feed.mode == "cache" and not feed._cache.in_memory  # memory-mapped files on the CPU
    feed.close()


class RecordingFeed(api.TeacherFeed):
    """A TeacherFeed that counts the calls the trainer and ``distill`` make."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = collections.Counter()

    def configure(self, method) -> None:
        self.calls["configure"] += 1
        super().configure(method)

    def __call__(self, x, idx):
        self.calls["call"] += 1
        return super().__call__(x, idx)

    def close(self) -> None:
        self.calls["close"] += 1
        super().close()


def test_distill_uses_a_given_teacher_feed_and_leaves_it_open(data, teacher):
    train, test = data
    options = dict(method="fitnet", teacher_name="resnet34", student_name="resnet9", epochs=1, runs=2, **FAST)
    expected = api.distill(teacher, student, train, test, **options)
    feed = RecordingFeed(teacher, train, "cache", torch.device("cpu"))
    got = api.distill(teacher, student, train, test, teacher_feed=feed, **options)
    assert feed.calls["configure"] == 2 and feed.calls["call"] > 0 and feed.calls["close"] == 0
    idx = torch.tensor([1, 4])
    assert [f.shape[0] for f in feed(train.batch(idx)[0], idx).features] == [2, 2, 2, 2]  # cache still open
    feed.close()
    for a, b in zip(got.runs, expected.runs, strict=True):
        for key in ("loss", "train_acc", "test_acc"):
            assert [r[key] for r in a.history] == pytest.approx([r[key] for r in b.history]), key
    with pytest.raises(TypeError, match="configure"):
        api.distill(teacher, student, train, test, teacher_feed=object(), **options)


# ----------------------------------------------------------------------------- failures
class NaNAfter(nn.Module):
    """Logits become NaN from the ``after``-th training forward on."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.net = dropout_net()
        self.after, self.calls = after, 0

    def forward(self, x):
        logits = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                return logits * float("nan")
        return logits


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, data):
    train, test = data
    steps_per_epoch = len(BatchLoader(train, 8))
    model = NaNAfter(after=steps_per_epoch + 2)  # second step of epoch 2
    with pytest.raises(FloatingPointError, match=rf"loss 'ce' is nan at step {steps_per_epoch + 2} \(epoch 2"):
        api.train_teacher(model, train, test, out=str(tmp_path), epochs=3, lr=0.01, **FAST)
    assert len(read_metrics(tmp_path)) == 1
    meta = load_tensors(tmp_path / "checkpoint.pt")["meta"]
    assert json.loads(meta.numpy().tobytes().decode())["epoch"] == 1
    assert not (tmp_path / "model.pt").exists()


# ----------------------------------------------------------------------------- pieces
def test_evaluation_never_augments(data):
    train, test = data
    seen = []

    class Recording(nn.Module):  # keeps the images it is evaluated on
        def __init__(self):
            super().__init__()
            self.net = student()

        def forward(self, x):
            if not self.training:
                seen.append(x.detach().clone())
            return self.net(x)

    api.train_teacher(Recording, train, test.with_augment(True), epochs=1, lr=1e-3,
                      val_set=test.with_augment(True), **FAST)
    plain = test.with_augment(False).batch(torch.arange(len(test)))[0]
    evaluated = [images for images in seen if len(images) == len(test)]  # not the 2-image model check
    assert len(evaluated) == 2 and all(torch.equal(images, plain) for images in evaluated)  # val, test


def test_pack_state_round_trip():
    state = {"state": {0: {"step": torch.tensor(3.0), "buf": torch.ones(2)}, 1: {"buf": None}},
             "groups": [{"betas": (0.9, 0.99), "lr": 0.1, "name": "x", "params": [0, 1]}],
             "milestones": collections.Counter({4: 1, 8: 1})}
    tensors = {}
    packed = pack_state(state, tensors, "optim")
    json.dumps(packed)  # plain JSON
    back = unpack_state(json.loads(json.dumps(packed)), tensors)
    assert back["groups"] == state["groups"] and back["state"][1] == {"buf": None}
    assert torch.equal(back["state"][0]["buf"], torch.ones(2)) and list(back["state"]) == [0, 1]
    assert isinstance(back["milestones"], collections.Counter) and back["milestones"][5] == 0
    with pytest.raises(TypeError, match="cannot store"):
        pack_state({"f": object()}, {}, "x")


def test_a_last_batch_of_one_image_is_dropped_only_for_batch_norm(data, caplog):
    """24 training images in batches of 23: BatchNorm cannot normalise the 24th alone."""
    from featkd.train import DistContext, Trainer

    train, _ = data
    trainer = Trainer(TrainConfig(batch_size=23, lr=0.1, device="cpu"))
    with caplog.at_level("INFO", logger="featkd.train"):
        assert [len(trainer._train_loader(train, 0, False, bn)) for bn in (False, True)] == [2, 1]
    assert "last training batch would hold 1 image, which BatchNorm cannot normalise" in caplog.text
    assert len(trainer._train_loader(train, 0, True, True)) == 1
    two = Trainer(TrainConfig(batch_size=23, lr=0.1, device="cpu"), context=DistContext(world_size=2))
    with pytest.raises(ValueError, match="batch_size 23 is not divisible by 2 processes"):
        two._train_loader(train, 0, False, True)


def test_optimizer_and_schedules_follow_the_recipe():
    params = [nn.Parameter(torch.zeros(2))]
    adamw = build_optimizer(params, TrainConfig(), 0.01)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.01
    cycle = build_scheduler(adamw, TrainConfig(epochs=10), 0.01, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        adamw.step()
        lrs.append(adamw.param_groups[0]["lr"])
        cycle.step()
    assert max(range(100), key=lrs.__getitem__) in (29, 30)  # warm-up 30 % of the steps
    assert max(lrs) == pytest.approx(0.01, rel=1e-3) and lrs[-1] < 1e-5
    sgd = build_optimizer(params, TrainConfig(optimizer="sgd"), 0.05)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["weight_decay"] == 5e-4
    with pytest.raises(ValueError, match="optimizer must be adamw or sgd; got 'lion'"):  # config not validated
        build_optimizer(params, TrainConfig(optimizer="lion"), 0.05)
    from featkd.train import Trainer

    with pytest.raises(ValueError, match="Trainer needs a learning rate"):
        Trainer(TrainConfig(lr=None, device="cpu"))
    assert Trainer(TrainConfig(lr=None, device="cpu"), lr=0.3).lr == 0.3
    steps = build_scheduler(sgd, TrainConfig(optimizer="sgd", milestones=[2, 3]), 0.05, steps_per_epoch=5)
    seen = []
    for _ in range(20):
        sgd.step()
        seen.append(sgd.param_groups[0]["lr"])
        steps.step()
    assert seen[9] == pytest.approx(0.05) and seen[10] == pytest.approx(0.005) and seen[15] == pytest.approx(5e-4)
    assert default_lr("resnet9", "adamw") == 0.0075 and default_lr("vgg11_bn", "sgd") == 0.01
    with pytest.raises(ValueError, match="pass lr"):
        default_lr(None, "adamw")


def test_summarize_uses_sample_std():
    stats = summarize([0.5, 0.7, 0.9])
    assert stats["mean"] == pytest.approx(0.7) and stats["std"] == pytest.approx(0.2) and stats["std_ddof"] == 1
    assert summarize([0.4])["std"] is None
    assert format_mean_std(stats) == "0.7000 ± 0.2000" and format_mean_std(summarize([0.4])) == "0.4000"


def test_evaluate_and_autocast(data):
    train, test = data
    model = ClassifierModel(dropout_net())
    loader = BatchLoader(test, 5, shuffle=False)
    acc = evaluate(model, loader, torch.device("cpu"), "none")
    with torch.no_grad():
        x, y, _ = test.batch(torch.arange(len(test)))
        expected = (model.eval()(x)[0].argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(expected) and model.training is False
    assert isinstance(autocast_context(torch.device("cpu"), "bf16"), torch.autocast)
    with pytest.raises(ValueError, match="amp"):
        autocast_context(torch.device("cpu"), "fp8")


def test_unused_parameter_probe_finds_unused_student_head(data, teacher):
    """SimKD classifies with the teacher's tail: the student's own fc gets no gradient (DDP needs to know)."""
    from featkd.distillation import DistillModel, build_method

    train, _ = data
    x, _, _ = train.batch(torch.arange(2))
    net = student()
    method = build_method("simkd", teacher, net, teacher_layers=[16], student_layers=[4], num_classes=3,
                          sample_input=x)
    model = DistillModel(net, method)
    feed = api.TeacherFeed(teacher, train, "online", torch.device("cpu"))
    feed.configure(method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unused = _unused_parameters(model, BatchLoader(train, 8), feed, torch.device("cpu"), "none")
    assert unused and all(name.startswith("student.") for name in unused)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats restored
    plain = ClassifierModel(dropout_net())
    assert _unused_parameters(plain, BatchLoader(train, 8), None, torch.device("cpu"), "none") == []


def test_layer_lists(data, teacher):
    train, _ = data
    assert api.resolve_student_layers("paper", student(), "resnet9") == [1, 2, 3, 4]
    cpu = torch.device("cpu")
    assert api.resolve_teacher_layers("standard", teacher, "resnet34", 4, train, device=cpu) == [3, 7, 13, 16]
    assert api.spread_layers(teacher, 4) == [1, 6, 11, 16]  # GLs 1..16 (head at 18)
    unnamed = api.resolve_teacher_layers("standard", teacher, None, 4, train, device=cpu)
    assert unnamed == [1, 6, 11, 16]  # no standard list without a zoo name: evenly spread
    assert api.spread_layers(student(), 4) == [1, 2, 3, 4]
    assert api.resolve_student_layers("paper", dropout_net(), None) == [0, 1]  # only 2 GLs below the head
    assert api.resolve_teacher_layers([12, "layer3.1"], teacher, None, 4, train, device=cpu) == [12, "layer3.1"]
    assert api.default_teacher_layers("featkd") == "auto" and api.default_teacher_layers("fitnet") == "standard"
    assert api.method_uses_layers("fitnet") and not api.method_uses_layers("kd")
    with pytest.raises(ValueError, match="auto, standard"):
        api.resolve_teacher_layers("best", teacher, None, 4, train, device=torch.device("cpu"))


def test_a_model_without_layers_before_its_head_is_told_to_name_them(data):
    train, _ = data
    linear = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 3, 1), nn.Flatten())
    with pytest.raises(ValueError, match=r"no generalized layers .* give student_layers \(--student-layers\)"):
        api.resolve_student_layers("paper", linear, None)
    for spec in ("standard", "auto"):
        with pytest.raises(ValueError, match=r"before the head of Sequential .* give teacher_layers"):
            api.resolve_teacher_layers(spec, linear, None, 4, train, device=torch.device("cpu"))


def test_auto_layers_measure_quality_and_write_it(tmp_path, data, teacher, monkeypatch):
    train, test = data
    result = api.distill(teacher, student, train, test, method="featkd", teacher_name="resnet34",
                         student_name="resnet9", epochs=1, out=str(tmp_path), **FAST)
    from featkd.quality import QualityReport

    report = QualityReport.from_json(tmp_path / "quality.json")
    assert result.extra["teacher_layers"] == report.select(4)
    assert (tmp_path / "quality.png").is_file()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["teacher_layers"] == report.select(4) and results["student_layers"] == [1, 2, 3, 4]
    # the same command again (as after an interruption): the layers come from quality.json, not measured again
    import featkd.quality

    def no_measuring(*args, **kwargs):
        raise AssertionError("quality measured again")

    monkeypatch.setattr(featkd.quality, "measure", no_measuring)
    again = api.distill(teacher, student, train, test, method="featkd", teacher_name="resnet34",
                        student_name="resnet9", epochs=1, out=str(tmp_path), **FAST)
    assert again.extra["teacher_layers"] == report.select(4) and again.runs[0].history == result.runs[0].history


# ----------------------------------------------------------------------------- configs
def test_config_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student: resnet9\nstudent_width: 1/16\nepochs: 3\nteacher_layers: [12, 13, 14, 15]\n")
    config = DistillConfig.from_yaml(path)
    assert config.student_width == 0.0625 and config.epochs == 3 and config.teacher_layers == [12, 13, 14, 15]
    apply_overrides(config, ["epochs=5", "teacher_layers=auto", "student_layers=1,layer2.0",
                             "lr=1e-3", "augment=yes", "milestones=[10, 20]", "data_options=num_classes:4,noise:0.1"])
    assert (config.epochs, config.teacher_layers, config.student_layers) == (5, "auto", [1, "layer2.0"])
    assert config.lr == 0.001 and config.augment is True and config.milestones == [10, 20]
    assert config.data_options == {"num_classes": 4, "noise": 0.1}
    config.teacher_mode = "online"
    config.validate()
    config.to_yaml(tmp_path / "back.yaml")
    assert DistillConfig.from_yaml(tmp_path / "back.yaml") == config
    assert config.differences(DistillConfig.from_yaml(tmp_path / "back.yaml")) == []
    other = DistillConfig.from_yaml(tmp_path / "back.yaml")
    other.progress, other.epochs = False, 6
    assert config.differences(other) == ["epochs: 6 -> 5"]  # progress is not part of a run's identity


@pytest.mark.parametrize("override, message", [
    ("epochs=two", "epochs must be an integer"),
    ("width=abc", "width must be a number"),
    ("nope=1", "unknown option 'nope'"),
    ("augment=maybe", "augment must be true or false"),
    ("epochs", "not key=value"),
])
def test_override_type_errors(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(), [override])


@pytest.mark.parametrize("values, message", [
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(optimizer="adam"), "optimizer must be one of adamw, sgd"),
    (dict(model="resnet7"), "unknown model 'resnet7'"),
    (dict(data="mnist3"), "unknown dataset"),
    (dict(milestones=[5, 3]), "milestones"),
    (dict(pct_start=1.5), "pct_start"),
    (dict(device="tpu"), "device"),
])
def test_validate_rejects_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values).validate()


def test_distill_config_checks():
    with pytest.raises(ValueError, match="unknown method"):
        DistillConfig(method="magic").validate()
    with pytest.raises(ValueError, match="teacher_layers must be auto or standard"):
        DistillConfig(teacher_layers="best").validate()
    with pytest.raises(ValueError, match="teacher_mode=cache needs augment=false"):
        DistillConfig(teacher_mode="cache", augment=True).validate()
    assert parse_value("12,13", list[int]) == [12, 13] and parse_value("1/8", float) == 0.125


# ----------------------------------------------------------------------------- reports
def test_report_from_run_directories(tmp_path, data):
    train, test = data
    for name in ("a", "b"):
        api.train_teacher(dropout_net, train, test, out=str(tmp_path / name), epochs=2, lr=0.01, **FAST)
    runs = find_runs(tmp_path)
    assert [r.name for r in runs] == ["a", "b"] and runs[0].mean_curve("test_acc")[0] == [1, 2]
    path = write_report(tmp_path, title="two runs")
    text = path.read_text()
    assert "# two runs" in text and "| a |" in text and "curves.png" in text
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert markdown_table([{"x": "1", "y": "2"}]) == "| x | y |\n|---|---|\n| 1 | 2 |"
    with pytest.raises(FileNotFoundError):
        find_runs(tmp_path / "a" / "missing")
    assert [r.name for r in find_runs(tmp_path / "a")] == ["a"]  # a run directory itself: that run alone
    assert "| a |" in write_report(tmp_path / "a").read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no run directories"):
        find_runs(tmp_path / "empty")


def test_report_compares_every_run_with_the_reference_named(tmp_path):
    """Welch's test over seeds against the one reference given; one seed a side has no test."""
    from scipy import stats as scipy_stats

    from featkd.report import RunRecord, compare_to

    def record(name, accs):
        runs = [{"seed": i, "finished": True, "final_test_acc": a / 100} for i, a in enumerate(accs)]
        return RunRecord(name, tmp_path / name, {"method": "kd"}, {"runs": runs})

    ce, kd, fitnet = [85.0, 85.4, 84.9], [86.5, 86.9, 86.6], [85.1, 84.8, 85.3]
    runs = [record("ce", ce), record("kd", kd), record("fitnet", fitnet), record("one", [90.0]),
            RunRecord("unfinished", tmp_path / "u", {}, None)]
    rows = {row["run"]: row for row in compare_to(runs, "ce")}
    assert set(rows) == {"kd", "fitnet", "one", "unfinished"} and rows["kd"]["vs"] == "ce"
    reference = scipy_stats.ttest_ind(kd, ce, equal_var=False)
    assert rows["kd"]["difference (points)"] == f"{sum(kd) / 3 - sum(ce) / 3:+.2f}"
    assert rows["kd"]["p"] == (f"{reference.pvalue:.3f}" if reference.pvalue >= 0.001 else "<0.001")
    assert rows["kd"]["verdict"].startswith("better") and rows["fitnet"]["verdict"] == "no significant difference"
    close = {row["run"]: row for row in compare_to([record("ce", ce), record("near", [85.8, 85.6, 86.1])], "ce")}
    assert 0.01 <= float(close["near"]["p"]) <= 0.1 and close["near"]["verdict"].endswith(
        "(close: 5 seeds a side could move it)")
    assert rows["kd"]["seeds"] == "3 vs 3"
    assert float(rows["kd"]["Holm p"].lstrip("<")) >= float(rows["kd"]["p"].lstrip("<"))
    assert rows["one"]["verdict"] == "n/a (one seed: no variance estimate)" and rows["one"]["p"] == "—"
    assert rows["unfinished"]["verdict"] == "no finished run"
    assert compare_to(runs, "unfinished")[0]["verdict"] == "unfinished has no finished run"
    assert compare_to(runs, "ce", "bootstrap")[0]["verdict"].startswith("better")
    with pytest.raises(ValueError, match="no run directory named 'best'.*ce, kd"):
        compare_to(runs, "best")
    with pytest.raises(ValueError, match="test must be one of"):
        compare_to(runs, "ce", "magic")


def test_report_of_a_run_in_progress_names_the_layers_and_rule_it_trains_with(tmp_path):
    """Before results.json exists the report reads run.json, not a guess (k = 4, rule Q)."""
    from featkd.report import comparison_rows, load_run
    from featkd.selection import DEFAULT_RULE

    train, test = get_datasets("synthetic", num_classes=3, samples_per_class=8, test_per_class=4, image_size=8)
    teacher = create_model("resnet34", 3, 3, 8, 1 / 16).eval()
    out = tmp_path / "featkd"
    api.distill(teacher, lambda: create_model("resnet9", 3, 3, 8, 1 / 16), train, test, method="featkd",
                teacher_name="resnet34", student_name="resnet9", student_layers=[2, 3, 4], epochs=2,
                stop_after_epochs=1, out=str(out), **FAST)
    assert not (out / "results.json").exists()
    settings = json.loads((out / "run.json").read_text())
    layers = settings["teacher_layers"]
    assert len(layers) == 3 and settings["selected_by"] == DEFAULT_RULE
    text = write_report(tmp_path).read_text()
    assert f"(3 by rule `{DEFAULT_RULE}`, in depth order): **{layers}**" in text
    row = comparison_rows([load_run(out)])[0]
    assert row["teacher layers"] != "–" and row["final acc"] == "unfinished"
    (out / "quality.png").unlink()  # a report regenerates the plot it links to
    assert "quality.png" in write_report(tmp_path).read_text() and (out / "quality.png").stat().st_size > 1000


def test_report_skips_a_cut_off_last_metrics_line_and_names_damaged_files(tmp_path, data, caplog):
    from featkd.report import load_run

    train, test = data
    api.train_teacher(dropout_net, train, test, out=str(tmp_path), epochs=2, lr=0.01, **FAST)
    metrics = tmp_path / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"seed": 0, "epoch": 3, "lo')
    with caplog.at_level("WARNING", logger="featkd.report"):
        assert [r["epoch"] for r in load_run(tmp_path).histories[0]] == [1, 2]
    assert "cut off" in caplog.text
    metrics.write_text('{"seed": 0, "ep\n' + whole)
    with pytest.raises(ValueError, match="line 1: not a JSON record"):
        load_run(tmp_path)
    metrics.write_text(whole)
    for name, damaged in (("results.json", '{"runs": [\x01'), ("config.yaml", "epochs: [1, 2\n")):
        path = tmp_path / name
        good = path.read_text()
        path.write_text(damaged)
        with pytest.raises(ValueError, match=f"{name}: damaged, does not parse \\(") as error:
            load_run(tmp_path)
        assert "\n" not in str(error.value)  # one line for the CLI
        path.write_text(good)


def test_an_empty_test_or_validation_set_is_refused_before_training(tmp_path, data):
    train, test = data
    empty = test.subset(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="the test set is empty"):
        api.train_teacher(dropout_net, train, empty, epochs=1, lr=0.01, **FAST)
    with pytest.raises(ValueError, match="the validation set is empty"):
        api.train_teacher(dropout_net, train, test, val_set=empty, epochs=1, lr=0.01, **FAST)


def test_validation_split_picks_the_best_epoch_and_never_the_test_split(tmp_path):
    from featkd.data import load_splits

    train, val, test = load_splits("synthetic", num_classes=3, samples_per_class=12, test_per_class=4,
                                   image_size=8, val_size=9)
    result = api.train_teacher(lambda: create_model("resnet9", 3, 3, 8, 1 / 16), train, test, val_set=val,
                               model_name="resnet9", epochs=3, out=str(tmp_path / "run"), **FAST)
    run = result.runs[0]
    records = read_metrics(tmp_path / "run")
    assert all("val_acc" in r and "test_acc" in r for r in records)
    vals = [r["val_acc"] for r in records]
    assert run.best_val_epoch == vals.index(max(vals)) + 1
    assert run.test_acc_at_best_val == records[run.best_val_epoch - 1]["test_acc"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test_acc_at_best_val"]["mean"] == pytest.approx(run.test_acc_at_best_val)
    assert saved["final_val_acc"]["mean"] == pytest.approx(vals[-1])
    # without a validation split there is no best epoch (the test split never picks one)
    plain = api.train_teacher(lambda: create_model("resnet9", 3, 3, 8, 1 / 16), train, test,
                              model_name="resnet9", epochs=2, **FAST)
    assert plain.runs[0].best_val_epoch is None and plain.summary()["test_acc_at_best_val"]["n"] == 0


def test_channels_last_is_the_default_for_conv_models_and_does_not_change_results(data):
    from featkd.train import channels_last_format

    train, test = data
    assert channels_last_format(create_model("resnet9", 3, 3, 8, 1 / 8)) is torch.channels_last
    assert channels_last_format(create_model("resnet9", 3, 3, 8, 1 / 8), False) is torch.contiguous_format
    assert channels_last_format(nn.Sequential(nn.Flatten(), nn.Linear(4, 2))) is torch.contiguous_format
    runs = {}
    for flag in (True, False):
        # width 1/8: every strided 1x1 convolution has >= 8 input channels, so channels_last is used
        result = api.train_teacher(lambda: create_model("resnet9", 3, 3, 8, 1 / 8), train, test,
                                   model_name="resnet9", epochs=2, channels_last=flag, **FAST)
        runs[flag] = result.runs[0]
    conv = runs[True].model.get_submodule("stem.conv").weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for a, b in zip(runs[True].history, runs[False].history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_channels_last_is_off_for_strided_1x1_convolutions_of_few_channels(caplog, monkeypatch):
    """oneDNN's AVX2 channels-last weight gradient of such a convolution is wrong (or crashes)."""
    from featkd.train import channels_last_format

    def net(in_channels: int, stride: int, kernel: int = 1) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, 8, kernel, stride), nn.Flatten())

    monkeypatch.setattr("featkd.train._CHANNELS_LAST_WARNED", set())
    with caplog.at_level("WARNING", logger="featkd.train"):
        assert channels_last_format(net(4, 2), warn=True) is torch.contiguous_format
        assert channels_last_format(net(4, 2), warn=True) is torch.contiguous_format
    assert caplog.text.count("channels_last off") == 1  # once, not once per run
    with caplog.at_level("WARNING", logger="featkd.train"):  # a model that only predicts: the same format, quietly
        assert channels_last_format(net(4, 3)) is torch.contiguous_format
    assert caplog.text.count("channels_last off") == 1
    # resnet9 at 1/16: layer2's downsample is a 1x1/2 convolution of 4 input channels
    assert channels_last_format(create_model("resnet9", 3, 3, 8, 1 / 16)) is torch.contiguous_format
    assert channels_last_format(net(8, 2)) is torch.channels_last
    assert channels_last_format(net(4, 1)) is torch.channels_last
    assert channels_last_format(net(4, 2, kernel=3)) is torch.channels_last
    for in_channels in (4, 8):  # whichever format is chosen, the gradient is the contiguous one
        model = net(in_channels, 2)
        x = torch.randn(8, in_channels, 32, 32)
        grads = []
        for fmt in (channels_last_format(model), torch.contiguous_format):
            copy = net(in_channels, 2).to(memory_format=fmt)
            copy.load_state_dict(model.state_dict())
            copy(x.contiguous(memory_format=fmt)).square().sum().backward()
            grads.append(copy[0].weight.grad.contiguous())
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def test_compile_option_trains_through_torch_compile(data, monkeypatch):
    # Dynamo traces for real; the "eager" backend skips inductor's C++ code generation (minutes here).
    compiled = []
    real_compile = torch.compile

    def eager_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    train, test = data
    result = api.train_teacher(lambda: create_model("resnet9", 3, 3, 8, 1 / 16), train, test,
                               model_name="resnet9", epochs=1, compile=True, **FAST)
    assert result.finished and 0.0 <= result.runs[0].final_test_acc <= 1.0
    assert len(compiled) == 1 and isinstance(compiled[0], ClassifierModel)
    assert TrainConfig(compile=True).differences(TrainConfig()) == []   # a runtime option: resumable


def test_compiled_runs_in_one_process_each_tap_their_own_layers(data, teacher, eager_compile):
    # torch does not guard compiled code on module hooks: featkd compiled after ce (no hooks) once
    # reused ce's code, the taps never fired and it failed; compiled must equal eager, run after run
    train, test = data

    def losses(method: str, compiled: bool) -> list[float]:
        result = api.distill(teacher, lambda: create_model("resnet9", 3, 3, 8, 1 / 16), train, test,
                             method=method, teacher_name="resnet34", student_name="resnet9", epochs=1,
                             compile=compiled, **FAST)
        return [r["loss"] for r in result.runs[0].history]

    for method in ("ce", "featkd", "simkd", "fitnet"):
        assert losses(method, True) == losses(method, False), method


def test_eval_every_evaluates_some_epochs_and_the_last_and_picks_among_them(tmp_path):
    from featkd.data import load_splits
    from featkd.report import load_run

    train, val, test = load_splits("synthetic", num_classes=3, samples_per_class=12, test_per_class=4,
                                   image_size=8, val_size=9)
    result = api.train_teacher(lambda: create_model("resnet9", 3, 3, 8, 1 / 16), train, test, val_set=val,
                               model_name="resnet9", epochs=5, eval_every=2, out=str(tmp_path / "run"), **FAST)
    records = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in records if "test_acc" in r] == [2, 4, 5]
    assert [r["epoch"] for r in records if "val_acc" in r] == [2, 4, 5]
    run = result.runs[0]
    assert run.final_test_acc == records[-1]["test_acc"] and run.best_val_epoch in (2, 4, 5)
    assert load_run(tmp_path / "run").mean_curve("test_acc")[0] == [2, 4, 5]
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=0).validate()


def test_extending_the_runs_drops_the_old_summary_until_the_new_ones_finish(tmp_path, data):
    train, test = data
    options = dict(epochs=1, lr=0.01, **FAST)
    out, summary = str(tmp_path / "runs"), tmp_path / "runs" / "results.json"
    api.train_teacher(dropout_net, train, test, out=out, runs=2, **options)
    assert len(json.loads(summary.read_text())["runs"]) == 2

    def crash(record):
        raise KeyboardInterrupt("stopped during the third run")

    with pytest.raises(KeyboardInterrupt):
        api.train_teacher(dropout_net, train, test, out=out, runs=3, callbacks=[crash], **options)
    assert not summary.exists()  # it would describe 2 runs of a 3-run directory
    api.train_teacher(dropout_net, train, test, out=out, runs=3, **options)
    assert [r["seed"] for r in json.loads(summary.read_text())["runs"]] == [0, 1, 2]


def test_sample_input_is_two_unaugmented_training_images(data):
    train, _ = data
    augmented = train.with_augment(True)
    x = api.sample_input(augmented)
    assert x.shape == (2, *train.image_shape)
    torch.testing.assert_close(x, train.with_augment(False).batch(torch.arange(2))[0])
    torch.testing.assert_close(api.sample_input(augmented), x)  # no random crop or flip


def test_a_last_batch_of_one_image_is_dropped_for_batch_norm(data, caplog):
    train, test = data  # 24 training images: batches of 23 leave one
    with caplog.at_level("INFO", logger="featkd.train"):
        result = api.train_teacher(student, train, test, epochs=1, **{**FAST, "batch_size": 23}, lr=0.01)
    assert "it is dropped" in caplog.text and result.runs[0].history[0]["train_acc"] >= 0
    caplog.clear()
    with caplog.at_level("INFO", logger="featkd.train"):  # no BatchNorm: every image is used
        api.train_teacher(dropout_net, train, test, epochs=1, **{**FAST, "batch_size": 23}, lr=0.01)
    assert "it is dropped" not in caplog.text


def test_progress_bars_are_drawn_only_on_a_terminal(data, teacher, capsys, monkeypatch):
    train, test = data
    options = dict(FAST, progress=True, epochs=1, teacher_mode="cache", teacher_layers="auto",
                   teacher_name="resnet34", student_name="resnet9")
    api.distill(teacher, student, train, test, method="featkd", **options)
    assert "img/s" not in capsys.readouterr().err  # a log file gets no bars
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    api.distill(teacher, student, train, test, method="featkd", **options)
    err = capsys.readouterr().err
    assert "teacher cache" in err and "quality" in err  # a terminal does
