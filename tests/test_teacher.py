"""OnlineTeacher and TeacherCache (RAM and memmap) give the same teacher outputs; the memmap
folders never outlive their run (SIGTERM, or removed at the restart after a kill)."""

import logging
import os
import signal
import subprocess
import sys

import pytest
import torch

import featkd.api as api
from featkd.data import ImageDataset
from featkd.distillation import (
    DistillModel, OnlineTeacher, TeacherCache, TeacherOutputs, build_method,
)
from featkd.distillation.teacher import remove_stale_caches
from featkd.layers import extract
from featkd.models import create_model
from featkd.train import read_metrics

NUM_CLASSES = 5
TEACHERS = {"resnet34": [3, 16], "vit_b": [2, 10]}


def make_dataset(size=20, augment=True):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(size) % NUM_CLASSES
    return ImageDataset(images, labels, augment=augment)


def make_teacher(name):
    torch.manual_seed(0)
    return create_model(name, NUM_CLASSES, width=1 / 16).eval()


def plain_batch(dataset, idx):
    return dataset.with_augment(False).batch(torch.as_tensor(idx))[0]


def assert_outputs_equal(a: TeacherOutputs, b: TeacherOutputs, exact=True):
    assert len(a.features) == len(b.features)
    for fa, fb in zip([*a.features, a.logits], [*b.features, b.logits]):
        assert fa.shape == fb.shape and fa.dtype == fb.dtype == torch.float32
        assert torch.equal(fa, fb) if exact else torch.allclose(fa, fb, atol=1e-5, rtol=1e-4)


def test_online_teacher_taps_in_eval_mode_without_grad():
    teacher = make_teacher("vit_b").train()
    x = plain_batch(make_dataset(), range(4))
    out = OnlineTeacher(teacher, [10, 2], need_logits=True)(x)
    assert not teacher.training
    assert [f.shape for f in out.features] == [f.shape for f in extract(teacher, x, [10, 2])]
    assert out.features[0].shape[1:] == (65, 48)                 # tokens kept (B, T, d)
    assert torch.equal(out.logits, teacher(x))
    assert not any(t.requires_grad for t in [*out.features, out.logits])
    features_only = OnlineTeacher(teacher, [2], need_logits=False)(x)
    assert features_only.logits is None and torch.equal(features_only.features[0], out.features[1])
    assert OnlineTeacher(teacher, [], need_logits=False)(x) == TeacherOutputs([], None)
    cnn = make_teacher("resnet34").eval()
    norm = next(m for m in cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)).train()
    before = norm.running_mean.clone()
    OnlineTeacher(cnn, [3], need_logits=False)(x)
    assert torch.equal(norm.running_mean, before) and not norm.training  # a submodule left training


@pytest.mark.parametrize("name", list(TEACHERS))
@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["ram", "memmap"])
def test_cache_matches_online_teacher(name, budget, tmp_path):
    teacher, dataset = make_teacher(name), make_dataset()
    layers = TEACHERS[name]
    cache = TeacherCache.build(teacher, dataset, layers, need_logits=True, batch_size=8,
                               device="cpu", memory_budget_bytes=budget, cache_dir=tmp_path,
                               progress=False)
    assert dataset.augment                                        # the caller's dataset unchanged
    assert len(cache) == len(dataset) and cache.in_memory == (budget > 0)
    online = OnlineTeacher(teacher, layers, need_logits=True)
    # same batch composition as the build: bit-identical
    assert_outputs_equal(cache.lookup(torch.arange(8, 16), "cpu"),
                         online(plain_batch(dataset, range(8, 16))))
    # any order, repeats, on the un-augmented images
    idx = torch.tensor([17, 3, 0, 9, 9, 19])
    assert_outputs_equal(cache.lookup(idx, "cpu"), online(plain_batch(dataset, idx)), exact=False)
    if not cache.in_memory:
        directory = cache.directory
        assert directory.parent == tmp_path and any(directory.iterdir())
        cache.close()
        assert not directory.exists()


def test_cache_stores_only_what_is_asked_and_supports_float16():
    teacher, dataset = make_teacher("resnet34"), make_dataset()
    full = TeacherCache.build(teacher, dataset, [3], need_logits=False, batch_size=16, device="cpu",
                              memory_budget_bytes=1 << 30, progress=False)
    half = TeacherCache.build(teacher, dataset, [3], need_logits=False, batch_size=16, device="cpu",
                              memory_budget_bytes=1 << 30, dtype=torch.float16, progress=False)
    idx = torch.arange(20)
    a, b = full.lookup(idx), half.lookup(idx)
    assert a.logits is None and len(a.features) == 1
    assert half.nbytes * 2 == full.nbytes == 20 * a.features[0][0].numel() * 4
    assert b.features[0].dtype == torch.float32
    assert torch.allclose(a.features[0], b.features[0], rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="dtype"):
        TeacherCache.build(teacher, dataset, [3], need_logits=False, batch_size=16, device="cpu",
                           memory_budget_bytes=0, dtype=torch.int8)


def test_memmap_in_a_temporary_directory_is_removed():
    teacher, dataset = make_teacher("resnet34"), make_dataset(size=6)
    cache = TeacherCache.build(teacher, dataset, [16], need_logits=True, batch_size=4, device="cpu",
                               memory_budget_bytes=0, progress=False)
    directory = cache.directory
    assert directory.exists() and not cache.in_memory
    del cache
    assert not directory.exists()


def test_a_teacher_failing_mid_build_leaves_no_cache_folder(tmp_path):
    teacher, dataset = make_teacher("resnet34"), make_dataset(size=12)
    calls = []

    def fail_on_the_second_batch(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("teacher failed")

    teacher.register_forward_pre_hook(fail_on_the_second_batch)
    with pytest.raises(RuntimeError, match="teacher failed"):
        TeacherCache.build(teacher, dataset, [16], need_logits=True, batch_size=4, device="cpu",
                           memory_budget_bytes=0, cache_dir=tmp_path, progress=False)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []  # the memmap folder of batch 1 is gone
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        TeacherCache.build(teacher, dataset, [16], True, batch_size=0, device="cpu", memory_budget_bytes=0)

    class NoImages:  # any dataset type: ImageDataset itself refuses to be empty
        def with_augment(self, augment):
            return self

        def __len__(self):
            return 0

    with pytest.raises(ValueError, match="empty dataset"):
        TeacherCache.build(teacher, NoImages(), [16], True, batch_size=4, device="cpu", memory_budget_bytes=0)


@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["ram", "memmap"])
def test_cached_and_online_teacher_give_identical_losses(budget, tmp_path):
    torch.manual_seed(0)
    teacher = make_teacher("resnet34")
    student = create_model("resnet9", NUM_CLASSES, width=1 / 16).eval()
    dataset = make_dataset(size=16)
    idx = torch.arange(8)
    x, y, _ = dataset.with_augment(False).batch(idx)
    method = build_method("featkd_ce_kd", teacher, student, teacher_layers=[3, 7, 13, 16],
                          student_layers=[1, 2, 3, 4], num_classes=NUM_CLASSES, sample_input=x)
    cache = TeacherCache.build(teacher, dataset, method.teacher_layers, method.needs_teacher_logits,
                               batch_size=8, device="cpu", memory_budget_bytes=budget,
                               cache_dir=tmp_path, progress=False)
    online = OnlineTeacher(teacher, method.teacher_layers, method.needs_teacher_logits)
    model = DistillModel(student, method)
    _, from_cache = model(x, y, cache.lookup(idx, "cpu"))
    _, from_online = model(x, y, online(x))
    assert from_cache.keys() == from_online.keys() == {"ce", "kd", "feat"}
    for key in from_cache:
        assert torch.equal(from_cache[key], from_online[key]), key


# ----------------------------------------------------------------------------- memmap folders of a killed run
# 48 images of 32x32: the features of layers 3, 7, 13, 16 take ~1.5 MB, over a 1 MiB budget (memmap).
DISK = dict(method="featkd", teacher_layers=[3, 7, 13, 16], student_name="resnet9", teacher_mode="cache",
            cache_memory_mb=1, epochs=2, batch_size=16, eval_batch_size=64, progress=False, device="cpu")


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s")} for r in records]


def tiny_student():
    return create_model("resnet9", NUM_CLASSES, width=1 / 16)


@pytest.fixture(scope="module")
def disk_run(tmp_path_factory):
    """teacher, train, test and the metrics of an undisturbed run whose cache goes to memmap files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    teacher, train, test = make_teacher("resnet34"), make_dataset(48, augment=False), make_dataset(10, augment=False)
    out = tmp_path_factory.mktemp("clean")
    api.distill(teacher, tiny_student, train, test, out=str(out), **DISK)
    torch.set_num_threads(threads)
    return teacher, train, test, without_timing(read_metrics(out))


def cache_folders(directory):
    return sorted(p.name for p in directory.glob("featkd-teacher-cache-*"))


def test_a_restarted_run_removes_the_cache_folder_a_killed_process_left(tmp_path, caplog, disk_run, one_thread):
    teacher, train, test, reference = disk_run
    stale = tmp_path / "featkd-teacher-cache-old"   # as SIGKILL leaves it: memmaps and an unheld lock
    stale.mkdir()
    (stale / "feature0.bin").write_bytes(bytes(4096))
    (stale / "owner.lock").touch()
    with caplog.at_level(logging.INFO, logger="featkd"):
        api.distill(teacher, tiny_student, train, test, out=str(tmp_path), **DISK)
    assert "in memmap files under" in caplog.text                     # the run did cache to disk
    assert f"removing the stale teacher cache {stale}" in caplog.text
    assert cache_folders(tmp_path) == []                              # the stale one and its own are gone
    assert without_timing(read_metrics(tmp_path)) == reference


def test_sigterm_removes_the_cache_folder_and_the_run_resumes(tmp_path, disk_run, one_thread):
    teacher, train, test, reference = disk_run
    seen = []

    def terminate(record):
        seen.append(cache_folders(tmp_path))
        # never send it to a default handler: that would end pytest
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as stopped:
        api.distill(teacher, tiny_student, train, test, out=str(tmp_path), callbacks=[terminate], **DISK)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert len(seen) == 1 and len(seen[0]) == 1                       # a memmap cache existed at the signal
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL         # handler restored
    assert cache_folders(tmp_path) == [] and (tmp_path / "checkpoint.pt").is_file()
    api.distill(teacher, tiny_student, train, test, out=str(tmp_path), **DISK)
    assert cache_folders(tmp_path) == []
    assert without_timing(read_metrics(tmp_path)) == reference


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_stale_cache_removal_keeps_the_caches_in_use(tmp_path):
    dead = tmp_path / "featkd-teacher-cache-dead"          # its process died before taking the lock
    dead.mkdir()
    ours = TeacherCache.build(make_teacher("resnet34"), make_dataset(size=4), [16], need_logits=False,
                              batch_size=4, device="cpu", memory_budget_bytes=0, cache_dir=tmp_path,
                              progress=False)
    other = tmp_path / "featkd-teacher-cache-other"        # held by another live process
    other.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'wb'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)", str(other / "owner.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert remove_stale_caches(tmp_path) == [dead]
        assert cache_folders(tmp_path) == sorted([ours.directory.name, other.name])
        assert len(ours.lookup(torch.arange(4)).features[0]) == 4
    finally:
        holder.kill()                                      # SIGKILL: the OS drops its lock
        holder.wait()
        holder.stdout.close()
    assert remove_stale_caches(tmp_path) == [other]
    ours.close()
    assert cache_folders(tmp_path) == [] and remove_stale_caches(tmp_path / "missing") == []


@pytest.mark.parametrize("method_name", ["featkd", "fitnet", "fitnet_fc", "sp"])
def test_maps_pooled_once_in_the_cache_leave_every_loss_unchanged(method_name):
    """A student with smaller maps (mobilenetv2): the cache pools the teacher's maps once, bit for
    bit what the losses did on every batch."""
    torch.manual_seed(0)
    teacher = make_teacher("resnet34")
    student = create_model("mobilenetv2", NUM_CLASSES, width=1 / 16).eval()
    dataset = make_dataset(size=16, augment=False)
    idx = torch.tensor([5, 0, 11, 3, 3, 14, 8, 1])
    x, y, _ = dataset.batch(idx)
    method = build_method(method_name, teacher, student, teacher_layers=[3, 7, 13, 16],
                          student_layers=[3, 6, 13, 17], num_classes=NUM_CLASSES, sample_input=x)
    sizes = method.teacher_pool_sizes()
    if method_name in ("featkd", "fitnet"):  # one student layer per teacher layer, each map halved
        assert sizes == [(16, 16), (8, 8), (4, 4), (2, 2)]
    else:  # a teacher map used at several sizes (fitnet_fc), or whole (sp): nothing to pool ahead
        assert sizes == [None] * 4
    feed = api.TeacherFeed(teacher, dataset, "cache", torch.device("cpu"), batch_size=16, progress=False)
    feed.configure(method)
    pooled = feed(x, idx)
    full = feed._cache.lookup(idx)
    for feat, whole, size in zip(pooled.features, full.features, sizes):
        assert feat.shape[2:] == (size or whole.shape[2:])
    model = DistillModel(student, method)
    _, with_pooled = model(x, y, pooled)
    _, with_full = model(x, y, full)
    for key in with_full:
        assert torch.equal(with_pooled[key], with_full[key]), key
    feed.close()


def test_the_cache_pools_only_when_the_copy_fits_beside_it(caplog):
    teacher, dataset = make_teacher("resnet34"), make_dataset(size=16, augment=False)
    student = create_model("mobilenetv2", NUM_CLASSES, width=1 / 16).eval()
    x, _, _ = dataset.batch(torch.arange(2))
    method = build_method("featkd", teacher, student, teacher_layers=[3, 7, 13, 16],
                          student_layers=[3, 6, 13, 17], num_classes=NUM_CLASSES, sample_input=x)
    full_bytes = 16 * sum(4 * c * s * s for c, s in ((4, 32), (8, 16), (16, 8), (32, 4)))  # width 1/16
    for budget, pools in ((full_bytes + full_bytes // 4, True), (full_bytes, False)):
        feed = api.TeacherFeed(teacher, dataset, "cache", torch.device("cpu"), batch_size=16,
                               memory_budget_bytes=budget, progress=False)
        feed.configure(method)
        with caplog.at_level(logging.INFO, logger="featkd.distillation.teacher"):
            first = feed(x, torch.arange(2)).features[0]
        assert first.shape[2:] == ((16, 16) if pools else (32, 32))
        assert ("maps pooled once" if pools else "no room to pool") in caplog.text
        caplog.clear()
        feed.close()
