import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from featkd.data import (
    BatchLoader,
    ImageDataset,
    channel_stats,
    class_balanced_subset,
    convert_channels,
    derive_generator,
    get_datasets,
    list_datasets,
    normalize,
    random_crop_flip,
    resize_images,
    stratified_subset,
)
from featkd.data.sources import FASHION_MNIST_SYSTEM_DIR


def synthetic(**kw):
    args = dict(num_classes=4, samples_per_class=6, test_per_class=3, image_size=8)
    args.update(kw)
    return get_datasets("synthetic", **args)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- registry

def test_list_datasets_and_bad_names():
    assert set(list_datasets()) == {"digits", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet",
                                    "imagefolder", "synthetic"}
    with pytest.raises(ValueError, match="valid:.*cifar10"):
        get_datasets("mnist3d")
    with pytest.raises(ValueError, match="unknown option.*bogus.*samples_per_class"):
        get_datasets("synthetic", bogus=1)


def test_dataset_options_are_checked_against_the_loaders_types_and_featkds_own_settings():
    from featkd.data import check_data_options, load_splits

    with pytest.raises(ValueError, match="option num_classes must be int, got '3'"):
        load_splits("synthetic", num_classes="3")
    with pytest.raises(ValueError, match="option samples_per_class must be int, got True"):
        load_splits("synthetic", samples_per_class=True)
    small = load_splits("synthetic", num_classes=2, samples_per_class=2, test_per_class=1, noise=1)  # int for float
    assert len(small.train) == 4 and len(small.test) == 2
    check_data_options({"download": True, "val_seed": 1, "num_classes": 3})  # the dataset's or load_splits' own
    check_data_options({"augment": True}, passed=("seed",))  # a caller that does not set augment itself
    assert load_splits("synthetic", num_classes=2, samples_per_class=2, test_per_class=1, noise="1e-1")  # YAML text
    with pytest.raises(ValueError, match=r"\['root', 'seed'\] are not dataset options: use --data-root, --data-seed"):
        check_data_options({"seed": 1, "root": "x", "num_classes": 3})


def test_synthetic_is_deterministic_and_class_structured():
    train, test = synthetic(seed=3)
    again, _ = synthetic(seed=3)
    other, _ = synthetic(seed=4)
    assert train.images.shape == (24, 3, 8, 8) and test.images.shape == (12, 3, 8, 8)
    assert torch.equal(train.images, again.images) and not torch.equal(train.images, other.images)
    assert torch.bincount(train.labels).tolist() == [6] * 4 and train.num_classes == 4
    assert repr(train) == f"ImageDataset({train.name or 'unnamed'}: 24 images (3, 8, 8), 4 classes, augment=False)"
    # samples sit closer to their own class mean than to the other classes' means
    x = train.images.float().flatten(1)
    means = torch.stack([x[train.labels == c].mean(0) for c in range(4)])
    assert torch.equal(torch.cdist(x, means).argmin(1), train.labels)
    grey, _ = synthetic(in_channels=1, image_size=12)
    assert grey.images.shape == (24, 1, 12, 12)


def test_digits_real_bundled_data():
    train, test = get_datasets("digits")
    assert train.images.shape == (1438, 1, 32, 32) and test.images.shape == (359, 1, 32, 32)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255
    test_share = torch.bincount(test.labels, minlength=10) / torch.bincount(
        torch.cat([train.labels, test.labels]), minlength=10)
    assert ((test_share - 0.2).abs() < 0.01).all()  # stratified
    again, _ = get_datasets("digits")
    assert torch.equal(train.labels, again.labels) and torch.equal(train.images, again.images)
    rgb, rgb_test = get_datasets("digits", in_channels=3, image_size=16)
    assert rgb.images.shape == (1438, 3, 16, 16) and rgb_test.images.shape[1] == 3
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])


# ----------------------------------------------------------------------------- file formats

def write_idx(path, array, compress=True):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fashion(folder, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {"train": (rng.integers(1, 256, (20, 28, 28)), np.arange(20) % 10),
              "t10k": (rng.integers(1, 256, (10, 28, 28)), np.arange(10)[::-1])}
    suffix = ".gz" if compress else ""
    for split, (images, labels) in arrays.items():
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_files_padded_to_32(tmp_path, compress):
    arrays = write_fashion(tmp_path / "FashionMNIST" / "raw", compress)  # torchvision's layout
    train, test = get_datasets("fashion_mnist", root=tmp_path)
    assert train.images.shape == (20, 1, 32, 32) and test.images.shape == (10, 1, 32, 32)
    assert torch.equal(train.images[:, 0, 2:30, 2:30], torch.tensor(arrays["train"][0], dtype=torch.uint8))
    assert int(train.images[:, :, :2].max()) == 0 and int(train.images[:, :, :, 30:].max()) == 0
    assert test.labels.tolist() == list(range(10))[::-1] and train.classes[9] == "Ankle boot"
    raw, _ = get_datasets("fashion_mnist", root=tmp_path, pad=0, in_channels=3)
    assert raw.images.shape == (20, 3, 28, 28)


def test_idx_reader_rejects_bad_header(tmp_path):
    write_fashion(tmp_path)
    with open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(gzip.compress(struct.pack(">I", 0x0D01) + struct.pack(">I", 20) + bytes(80)))  # float type
    with pytest.raises(ValueError, match="unsigned-byte"):
        get_datasets("fashion_mnist", root=tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[: len(raw) // 2], "not a readable IDX file .*ended before"),        # cut-off download
    (lambda raw: raw[:10] + bytes(len(raw) - 10), "not a readable IDX file"),            # corrupt deflate data
    (lambda raw: gzip.decompress(raw), "not a readable IDX file .*Not a gzipped file"),  # plain bytes named .gz
    (lambda raw: gzip.compress(gzip.decompress(raw)[:6]), "cut off inside its header"),
])
def test_damaged_idx_files_are_named_in_a_clear_error(tmp_path, damage, message):
    write_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as error:
        get_datasets("fashion_mnist", root=tmp_path)
    assert str(error.value).startswith(f"{path}: ")


@pytest.mark.parametrize("labels, message", [
    (np.full(10, 200), r"holds 10 label\(s\) outside 0..9 \(e.g. 200\)"),
    (np.arange(9), r"shape \(9,\), not 10 labels"),
    (np.zeros((10, 1)), r"shape \(10, 1\), not 10 labels"),
])
def test_fashion_mnist_labels_that_do_not_fit_their_images_are_refused(tmp_path, labels, message):
    write_fashion(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    write_idx(path, labels)
    with pytest.raises(ValueError, match=message) as error:
        get_datasets("fashion_mnist", root=tmp_path)
    assert str(error.value).startswith(f"{path}: ")


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_system_files_with_train_limit():
    train, test = get_datasets("fashion_mnist", train_limit=5000, seed=1)
    assert len(train) == 5000 and len(test) == 10000 and train.image_shape == (1, 32, 32)
    assert torch.bincount(train.labels).tolist() == [500] * 10


def cifar_entry(images, labels, label_key, byte_keys):
    entry = {"data": images.reshape(len(images), -1), label_key: list(labels)}
    return {k.encode(): v for k, v in entry.items()} if byte_keys else entry


def test_cifar10_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(12) % 10
    for i in range(5):  # python-2 style pickles load with bytes keys
        batch = cifar_entry(images[2 * i:2 * i + 2], labels[2 * i:2 * i + 2], "labels", byte_keys=True)
        pickle.dump(batch, open(folder / f"data_batch_{i + 1}", "wb"))
    pickle.dump(cifar_entry(images[10:], labels[10:], "labels", True), open(folder / "test_batch", "wb"))
    names = [f"name{i}" for i in range(10)]
    pickle.dump({b"label_names": names}, open(folder / "batches.meta", "wb"))
    train, test = get_datasets("cifar10", root=tmp_path)
    assert torch.equal(train.images, torch.from_numpy(images[:10]))
    assert train.labels.tolist() == labels[:10].tolist() and test.labels.tolist() == [0, 1]
    assert train.classes == names and train.image_shape == (3, 32, 32)
    direct, _ = get_datasets("cifar10", root=folder)  # the batch folder itself also works
    assert torch.equal(direct.images, train.images)


def test_cifar100_pickle_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    train = cifar_entry(images[:4], [99, 0, 5, 7], "fine_labels", byte_keys=False)
    train["coarse_labels"] = [1, 2, 3, 4]
    pickle.dump(train, open(folder / "train", "wb"))
    pickle.dump(cifar_entry(images[4:], [3, 99], "fine_labels", False), open(folder / "test", "wb"))
    pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, open(folder / "meta", "wb"))
    train_set, test_set = get_datasets("cifar-100", root=tmp_path, image_size=16)
    assert train_set.labels.tolist() == [99, 0, 5, 7] and test_set.labels.tolist() == [3, 99]
    assert train_set.num_classes == 100 and train_set.images.shape == (4, 3, 16, 16)


def save_solid(path, colour, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_tiny_imagenet_folder(tmp_path):
    folder = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    colours = {"n01": (250, 10, 10), "n02": (10, 10, 250)}
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        for k in range(2):
            save_solid(folder / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", colours[wnid], (64, 64))
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored")
    lines = []
    for k, wnid in enumerate(["n02", "n01", "n02"]):
        save_solid(folder / "val" / "images" / f"val_{k}.JPEG", colours[wnid], (64, 64))
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    train, test = get_datasets("tiny_imagenet", root=tmp_path)
    assert train.images.shape == (4, 3, 64, 64) and train.labels.tolist() == [0, 0, 1, 1]
    assert test.labels.tolist() == [1, 0, 1] and train.classes == wnids
    red = train.images[0].float().mean((1, 2))
    assert red[0] > 200 and red[2] < 50  # JPEG is lossy: compare colours loosely


def test_imagefolder_resizes_and_maps_classes(tmp_path):
    for split, count in (("train", 2), ("test", 1)):
        for name, colour in (("cat", (200, 100, 0)), ("dog", (0, 50, 255))):
            for k in range(count):
                save_solid(tmp_path / split / name / f"{k}.png", colour, (40 + 7 * k, 20))
    train, test = get_datasets("imagefolder", root=tmp_path)
    assert train.images.shape == (4, 3, 32, 32) and train.classes == ["cat", "dog"]
    assert train.labels.tolist() == [0, 0, 1, 1] and test.labels.tolist() == [0, 1]
    assert train.images[2:, :, 5, 5].tolist() == [[0, 50, 255]] * 2
    small, _ = get_datasets("imagefolder", root=tmp_path, image_size=8)
    assert small.image_shape == (3, 8, 8)
    save_solid(tmp_path / "test" / "bird" / "0.png", (1, 2, 3), (8, 8))
    with pytest.raises(ValueError, match="bird"):
        get_datasets("imagefolder", root=tmp_path)


def save_thirds(path, size):
    """A wide image whose left, middle and right thirds are red, green and blue."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    image = np.zeros((height, width, 3), dtype=np.uint8)
    for third in range(3):
        image[:, third * width // 3:(third + 1) * width // 3, third] = 255
    Image.fromarray(image).save(path)


def imagefolder(root, draw=save_thirds, size=(96, 32)):
    for split in ("train", "test"):
        for name in ("a", "b"):
            draw(root / split / name / "0.png", size)


def test_imagefolder_crops_the_centre_by_default_and_can_stretch(tmp_path):
    imagefolder(tmp_path)
    cropped, _ = get_datasets("imagefolder", root=tmp_path)
    centre = cropped.images[0].float()
    assert centre.shape == (3, 32, 32) and centre[1].min() == 255 and centre[[0, 2]].max() == 0  # all green
    stretched, _ = get_datasets("imagefolder", root=tmp_path, resize="stretch")
    row = stretched.images[0, :, 16].float()
    assert row[0, 2] > 200 and row[1, 16] > 200 and row[2, 29] > 200  # red, green, blue thirds kept
    tall, _ = get_datasets("imagefolder", root=tmp_path, image_size=8)
    assert tall.image_shape == (3, 8, 8)
    with pytest.raises(ValueError, match="resize must be one of crop, stretch; got 'squash'"):
        get_datasets("imagefolder", root=tmp_path, resize="squash")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_imagefolder_names_a_file_that_does_not_decode(tmp_path, damage):
    imagefolder(tmp_path)
    bad = tmp_path / "train" / "b" / "1.png"
    data = (tmp_path / "train" / "a" / "0.png").read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a png" * 20, "empty": b""}[damage])
    with pytest.raises(ValueError, match="cannot decode image") as error:
        get_datasets("imagefolder", root=tmp_path)
    assert str(error.value).startswith(f"{bad}:") and "\n" not in str(error.value)


def test_imagefolder_refuses_empty_class_folders_and_skips_hidden_ones(tmp_path):
    imagefolder(tmp_path)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    train, _ = get_datasets("imagefolder", root=tmp_path)
    assert train.classes == ["a", "b"]
    (tmp_path / "train" / "c").mkdir()
    (tmp_path / "train" / "c" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="class folder holds no images") as error:
        get_datasets("imagefolder", root=tmp_path)
    assert str(error.value).startswith(str(tmp_path / "train" / "c"))


class RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_cifar_files_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    pickle.dump(cifar_entry(images, [0, 1], "fine_labels", False), open(folder / "test", "wb"))
    pickle.dump({"data": RunsCode(), "fine_labels": [0]}, open(folder / "train", "wb"))
    with pytest.raises(ValueError, match="train: refused to unpickle posix.system"):
        get_datasets("cifar100", root=tmp_path)
    assert not (tmp_path / "pwned").exists()
    (folder / "train").write_bytes(pickle.dumps(cifar_entry(images, [0, 1], "fine_labels", False))[:100])
    with pytest.raises(ValueError, match="train: not a readable CIFAR python batch"):
        get_datasets("cifar100", root=tmp_path)
    pickle.dump({"pixels": images}, open(folder / "train", "wb"))
    with pytest.raises(ValueError, match="train: not a CIFAR batch \\(no 'data' or 'fine_labels' entry\\)"):
        get_datasets("cifar100", root=tmp_path)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_load(tmp_path, protocol):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = np.random.default_rng(protocol).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    for split in ("train", "test"):
        entry = cifar_entry(images, np.array([0, 5, 99]), "fine_labels", byte_keys=True)
        (folder / split).write_bytes(pickle.dumps(entry, protocol=protocol))
    train, _ = get_datasets("cifar100", root=tmp_path)
    assert torch.equal(train.images, torch.from_numpy(images)) and train.labels.tolist() == [0, 5, 99]


@pytest.mark.parametrize("name, hint", [
    ("fashion_mnist", "apt-get install dataset-fashion-mnist"),
    ("cifar10", "cifar-10-batches-py"),
    ("cifar100", "cifar-100-python"),
    ("tiny_imagenet", "val_annotations.txt"),
    ("imagefolder", "root/train/<class>"),
])
def test_missing_files_explain_where_and_how(tmp_path, name, hint):
    with pytest.raises(FileNotFoundError) as error:
        get_datasets(name, root=tmp_path / "nothing")
    message = str(error.value)
    assert str(tmp_path / "nothing") in message and hint in message
    if name != "imagefolder":
        assert "download=True" in message


# ----------------------------------------------------------------------------- normalisation

def test_channel_stats_match_float64_reference():
    images = torch.randint(0, 256, (50, 3, 5, 7), dtype=torch.uint8, generator=gen(0))
    mean, std = channel_stats(images, chunk_size=7)
    ref = images.double().permute(1, 0, 2, 3).flatten(1) / 255
    torch.testing.assert_close(mean.double(), ref.mean(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(std.double(), ref.std(1, unbiased=False), atol=1e-6, rtol=0)
    _, constant_std = channel_stats(torch.full((2, 1, 3, 3), 9, dtype=torch.uint8))
    assert constant_std.tolist() == [1.0]
    with pytest.raises(ValueError):
        channel_stats(torch.zeros(0, 3, 4, 4, dtype=torch.uint8))


def test_train_split_normalises_to_zero_mean_unit_std():
    train, test = synthetic()
    x, _, _ = train.batch(torch.arange(len(train)))
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    assert torch.equal(test.mean, train.mean) and torch.equal(test.std, train.std)
    white = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    assert torch.equal(normalize(white, train.mean, train.std).flatten(), (1 - train.mean) / train.std)


def test_train_limit_is_stratified_seeded_and_sets_stats():
    full, _ = synthetic(samples_per_class=10)
    small, _ = synthetic(samples_per_class=10, train_limit=20, seed=5)
    again, _ = synthetic(samples_per_class=10, train_limit=20, seed=5)
    assert torch.bincount(small.labels).tolist() == [5] * 4
    assert torch.equal(small.images, again.images)
    assert torch.equal(small.mean, channel_stats(small.images)[0]) and not torch.equal(small.mean, full.mean)
    with pytest.raises(ValueError, match=r"train_limit must be in \[1, 24\] for synthetic's 24 training images, got"):
        synthetic(train_limit=1000)
    with pytest.raises(ValueError, match=r"train_limit must be in \[1, 20\] .* left after the validation split"):
        synthetic(train_limit=24, val_size=4)


# ----------------------------------------------------------------------------- augmentation

def test_random_crop_flip_is_a_per_sample_crop_of_the_zero_padded_image():
    image = torch.randint(1, 256, (1, 2, 6, 6), dtype=torch.uint8, generator=gen(1))
    batch = image.repeat(32, 1, 1, 1)
    out = random_crop_flip(batch, padding=4, generator=gen(2))
    assert out.shape == batch.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(image[0], (4, 4, 4, 4))
    crops = {(dy, dx): padded[:, dy:dy + 6, dx:dx + 6] for dy in range(9) for dx in range(9)}
    candidates = {(dy, dx, flip): crop.flip(-1) if flip else crop
                  for (dy, dx), crop in crops.items() for flip in (0, 1)}
    chosen = [next(k for k, c in candidates.items() if torch.equal(c, sample)) for sample in out]
    assert len(set(chosen)) > 10 and {k[2] for k in chosen} == {0, 1}  # different draws in one batch
    assert torch.equal(out, random_crop_flip(batch, 4, gen(2)))
    assert not torch.equal(out, random_crop_flip(batch, 4, gen(3)))


def test_dataset_batch_augment_flag_and_shared_view():
    train, _ = synthetic(augment=False)
    indices = torch.tensor([3, 0, 3, 7])
    x, y, idx = train.batch(indices, gen(0))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == idx.dtype == torch.int64
    assert torch.equal(idx, indices) and torch.equal(y, train.labels[indices])
    assert torch.equal(x, normalize(train.images[indices], train.mean, train.std))
    assert torch.equal(x, train.batch(indices, gen(9))[0])  # no augmentation: generator unused
    augmented = train.with_augment(True)
    assert augmented.images is train.images and augmented.augment and not train.augment
    xa, _, _ = augmented.batch(indices, gen(0))
    assert xa.shape == x.shape and not torch.equal(xa, x)
    assert torch.equal(xa, augmented.batch(indices, gen(0))[0])
    assert not torch.equal(xa[0], xa[2])  # the same image, drawn differently
    # crop/flip act on raw pixels (zero padding), normalisation comes after
    expected = normalize(random_crop_flip(train.images[indices], 4, gen(0)), train.mean, train.std)
    assert torch.equal(xa, expected)


def test_getitem_and_subset():
    train, _ = synthetic()
    x, y, i = train[-1]
    assert i == len(train) - 1 and y == int(train.labels[-1])
    assert torch.equal(x, train.batch(torch.tensor([i]))[0][0])
    with pytest.raises(IndexError):
        train[len(train)]
    part = train.subset(torch.tensor([1, 5]))
    assert len(part) == 2 and torch.equal(part.mean, train.mean) and part.classes == train.classes
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3))
    with pytest.raises(ValueError, match="per channel"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2), mean=[0.5, 0.5], std=[1, 1])


def test_resize_and_channel_conversion():
    images = torch.full((3, 1, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(resize_images(images, 20), torch.full((3, 1, 20, 20), 77, dtype=torch.uint8))
    assert resize_images(images, 8) is images
    assert convert_channels(images, 3).shape == (3, 3, 8, 8)
    rgb = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    assert convert_channels(rgb, 1).item() == round(0.299 * 255)
    with pytest.raises(ValueError, match="in_channels"):
        convert_channels(rgb, 2)


# ----------------------------------------------------------------------------- subsets

def test_class_balanced_subset():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    chosen = class_balanced_subset(labels, 3, seed=0)
    assert torch.equal(chosen, chosen.sort().values) and chosen.unique().numel() == 9
    assert torch.bincount(labels[chosen]).tolist() == [3, 3, 3]
    assert torch.equal(chosen, class_balanced_subset(labels, 3, seed=gen(0)))
    draws = {tuple(class_balanced_subset(labels, 2, seed=s).tolist()) for s in range(10)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="class 1: 3"):
        class_balanced_subset(labels, 4, seed=0)
    with pytest.raises(ValueError, match="class 3: 0"):
        class_balanced_subset(labels, 1, seed=0, num_classes=4)


def test_stratified_subset_is_proportional():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    chosen = stratified_subset(labels, 10, seed=1)
    assert torch.bincount(labels[chosen]).tolist() == [6, 3, 1]
    assert torch.bincount(labels[stratified_subset(labels, 7, seed=1)]).tolist() == [4, 2, 1]
    assert torch.equal(chosen, stratified_subset(labels, 10, seed=1))
    with pytest.raises(ValueError):
        stratified_subset(labels, 0, seed=1)


# ----------------------------------------------------------------------------- loader

def loader_indices(loader):
    return torch.cat([idx for _, _, idx in loader])


def test_batch_loader_deterministic_and_reshuffles_per_epoch():
    train, _ = synthetic(augment=True)
    loader = BatchLoader(train, batch_size=5, seed=3)
    first = list(loader)
    assert len(first) == len(loader) == 5
    assert [b[0].shape[0] for b in first] == [5, 5, 5, 5, 4] and loader.last_batch_size == 4
    assert BatchLoader(train, 23).last_batch_size == 1 and BatchLoader(train, 23, drop_last=True).last_batch_size == 23
    assert [BatchLoader(train, 11, rank=r, world_size=2).last_batch_size for r in (0, 1)] == [1, 1]  # 12 per rank
    second = list(BatchLoader(train, batch_size=5, seed=3))
    for a, b in zip(first, second):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert sorted(loader_indices(loader).tolist()) == list(range(24))
    loader.set_epoch(1)
    assert not torch.equal(loader_indices(loader), torch.cat([b[2] for b in first]))
    assert not torch.equal(loader_indices(BatchLoader(train, 5, seed=4)), torch.cat([b[2] for b in first]))
    fixed = BatchLoader(train, batch_size=5, shuffle=False, seed=3)
    epoch0 = next(iter(fixed))[0]
    fixed.set_epoch(1)
    assert not torch.equal(epoch0, next(iter(fixed))[0])  # new augmentation draws per epoch
    x, y, idx = first[0]
    assert torch.equal(y, train.labels[idx]) and x.dtype == torch.float32 and x.device.type == "cpu"


def test_batch_loader_eval_order_and_drop_last():
    _, test = synthetic()
    loader = BatchLoader(test, batch_size=5, shuffle=False)
    assert loader_indices(loader).tolist() == list(range(12))
    x, _, _ = next(iter(loader))
    assert torch.equal(x, test.batch(torch.arange(5))[0])
    dropping = BatchLoader(test, batch_size=5, shuffle=False, drop_last=True)
    assert len(dropping) == 2 and loader_indices(dropping).tolist() == list(range(10))


def test_batch_loader_ranks_partition_the_data():
    train, _ = synthetic()  # 24 samples
    shards = [loader_indices(BatchLoader(train, 4, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 8 for s in shards)
    assert sorted(torch.cat(shards).tolist()) == list(range(24))  # disjoint and complete
    lengths = [len(BatchLoader(train, 4, rank=r, world_size=5)) for r in range(5)]
    padded = [loader_indices(BatchLoader(train, 4, seed=1, rank=r, world_size=5)) for r in range(5)]
    assert lengths == [2] * 5 and [len(p) for p in padded] == [5] * 5  # 24 -> 25 by wrapping
    assert set(torch.cat(padded).tolist()) == set(range(24))
    dropped = [loader_indices(BatchLoader(train, 4, seed=1, rank=r, world_size=5, drop_last=True))
               for r in range(5)]
    assert [len(d) for d in dropped] == [4] * 5 and torch.cat(dropped).unique().numel() == 20
    same = ImageDataset(train.images[:1].repeat(8, 1, 1, 1), torch.zeros(8), augment=True)
    rank_x = [next(iter(BatchLoader(same, 4, shuffle=False, rank=r, world_size=2)))[0] for r in range(2)]
    assert not torch.equal(rank_x[0], rank_x[1])  # augmentation draws differ between ranks
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(train, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(train, 0)


def test_batch_loader_accepts_plain_datasets():
    data = torch.utils.data.TensorDataset(torch.arange(10.0).view(10, 1), torch.arange(10) % 3)
    x, y, idx = next(iter(BatchLoader(data, 4, shuffle=False)))
    assert x.flatten().tolist() == [0, 1, 2, 3] and y.tolist() == [0, 1, 2, 0]
    assert idx.tolist() == [0, 1, 2, 3]


def test_derive_generator_streams():
    a = torch.rand(3, generator=derive_generator(1, 2, 3))
    assert torch.equal(a, torch.rand(3, generator=derive_generator(1, 2, 3)))
    assert not torch.equal(a, torch.rand(3, generator=derive_generator(1, 2, 4)))
    assert not torch.equal(a, torch.rand(3, generator=derive_generator(1, 3, 2)))
    # NumPy pads keys with zeros: the trailing tag of the augmentation's key keeps it apart
    shuffle = torch.randperm(9, generator=derive_generator(3, 1))
    assert torch.equal(shuffle, torch.randperm(9, generator=derive_generator(3, 1, 0)))
    assert not torch.equal(shuffle, torch.randperm(9, generator=derive_generator(3, 1, 0, 1)))


def test_validation_split_is_held_out_first_stratified_and_fixed():
    from featkd.data import load_splits

    full = load_splits("synthetic", num_classes=3, samples_per_class=20, test_per_class=4)
    split = load_splits("synthetic", num_classes=3, samples_per_class=20, test_per_class=4, val_size=9)
    assert full.val is None and len(split.val) == 9 and len(split.train) == 51
    assert torch.bincount(split.val.labels).tolist() == [3, 3, 3]
    train_rows = {tuple(x.flatten().tolist()) for x in split.train.images}
    val_rows = {tuple(x.flatten().tolist()) for x in split.val.images}
    assert not train_rows & val_rows                      # disjoint
    assert train_rows | val_rows == {tuple(x.flatten().tolist()) for x in full.train.images}
    # the split does not move with the training subset's seed, and train_limit subsets the rest
    digits = load_splits("digits", image_size=8, val_size=100)
    other = load_splits("digits", image_size=8, val_size=100, train_limit=300, seed=5)
    assert torch.equal(other.val.images, digits.val.images) and len(other.train) == 300
    digit_rows = {tuple(x.flatten().tolist()) for x in digits.val.images}
    assert not {tuple(x.flatten().tolist()) for x in other.train.images} & digit_rows
    # every split is normalised with the kept training images' statistics
    assert torch.equal(split.val.mean, split.train.mean) and torch.equal(split.test.std, split.train.std)
    assert not split.val.augment
    with pytest.raises(ValueError, match="val_size"):
        load_splits("synthetic", num_classes=3, samples_per_class=20, val_size=60)



def test_splits_name_the_settings_that_load_them_again(tmp_path):
    from featkd.api import data_source
    from featkd.data import load_splits

    settings = dict(image_size=12, in_channels=3, train_limit=40, seed=4, val_size=9, val_seed=1)
    splits = load_splits("synthetic", num_classes=3, samples_per_class=20, test_per_class=4, **settings)
    source = data_source(*splits)
    assert source == {"data": "synthetic", "data_root": None, "image_size": 12, "train_limit": 40, "data_seed": 4,
                      "val_size": 9, "val_seed": 1, "data_options": {"num_classes": 3, "samples_per_class": 20,
                                                                     "test_per_class": 4, "in_channels": 3}}
    assert [s.source["split"] for s in splits] == ["train", "val", "test"]
    again = load_splits(source["data"], source["data_root"], image_size=source["image_size"],
                        train_limit=source["train_limit"], seed=source["data_seed"], val_size=source["val_size"],
                        val_seed=source["val_seed"], **source["data_options"])
    for old, new in zip(splits, again):
        assert torch.equal(old.images, new.images) and torch.equal(old.labels, new.labels)
    assert splits.train.with_augment(True).source is splits.train.source  # the same images
    assert splits.train.subset(torch.arange(5)).source is None            # not what loading gives
    assert data_source(splits.train, None, splits.test) == source
    other = load_splits("synthetic", num_classes=3, samples_per_class=20, test_per_class=4, **{**settings, "seed": 5})
    assert data_source(splits.train, splits.val, other.test) is None        # splits of two loads
    assert data_source(splits.train, None, splits.val) is None              # the val split as test
    assert data_source(ImageDataset(splits.train.images, splits.train.labels), None, splits.test) is None
    (tmp_path / "digits").mkdir()
    assert load_splits("digits", tmp_path / "digits").test.source["data_root"] == str(tmp_path / "digits")

def write_cifar10(root, batches, meta=None):
    """cifar-10-batches-py under ``root``: ``batches`` maps file name -> (data, labels)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data, labels = batches.get(name, (np.zeros((2, 3072), np.uint8), [0, 9]))
        pickle.dump({"data": data, "labels": labels}, open(folder / name, "wb"))
    if meta is not None:
        pickle.dump(meta, open(folder / "batches.meta", "wb"))
    return folder


@pytest.mark.parametrize("batch, message", [
    ((np.zeros((2, 3000), np.uint8), [0, 1]), r"'data' has shape \(2, 3000\), not rows of 3072 bytes"),
    ((np.zeros((2, 32, 32, 3), np.uint8), [0, 1]), r"'data' has shape \(2, 32, 32, 3\), not rows"),  # HWC
    ((np.zeros((2, 3072), np.uint8), [0]), "1 labels for 2 images"),
    ((np.zeros((2, 3072), np.uint8), [3, 10]), r"labels holds 1 value\(s\) outside 0..9 \(e.g. 10\)"),
])
def test_cifar_batches_that_do_not_fit_name_their_file(tmp_path, batch, message):
    folder = write_cifar10(tmp_path, {"data_batch_3": batch})
    with pytest.raises(ValueError, match=message) as error:
        get_datasets("cifar10", root=tmp_path)
    assert str(error.value).startswith(f"{folder / 'data_batch_3'}: ")


def test_cifar_meta_names_are_read_as_text_and_checked(tmp_path):
    write_cifar10(tmp_path, {}, meta={b"label_names": [f"c{i}".encode() for i in range(10)]})
    train, _ = get_datasets("cifar10", root=tmp_path)
    assert train.classes == [f"c{i}" for i in range(10)]
    folder = write_cifar10(tmp_path, {}, meta={"names": ["a"]})
    with pytest.raises(ValueError, match="'label_names' should hold the 10 class names; found none") as error:
        get_datasets("cifar10", root=tmp_path)
    assert str(error.value).startswith(str(folder / "batches.meta"))


def test_tiny_imagenet_refuses_a_class_without_images_and_names_bad_annotation_lines(tmp_path):
    folder = tmp_path / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("n01\nn02\n")
    save_solid(folder / "train" / "n01" / "images" / "n01_0.JPEG", (250, 10, 10), (64, 64))
    save_solid(folder / "val" / "images" / "val_0.JPEG", (250, 10, 10), (64, 64))
    annotations = folder / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn01\t0\t0\t63\t63\n")
    with pytest.raises(ValueError, match="no training images for class 'n02'"):
        get_datasets("tiny_imagenet", root=tmp_path)
    save_solid(folder / "train" / "n02" / "images" / "n02_0.JPEG", (10, 10, 250), (64, 64))
    annotations.write_text("val_0.JPEG n01 0 0 63 63\r\n")  # spaces and CRLF read the same
    _, test = get_datasets("tiny_imagenet", root=tmp_path)
    assert test.labels.tolist() == [0]
    annotations.write_text("val_0.JPEG\tn01\nval_1.JPEG\n")
    with pytest.raises(ValueError, match=f"{annotations}, line 2: expected"):
        get_datasets("tiny_imagenet", root=tmp_path)
    annotations.write_text("val_0.JPEG\tn07\n")
    with pytest.raises(ValueError, match=f"{annotations}, line 1: 'n07' is not in wnids.txt"):
        get_datasets("tiny_imagenet", root=tmp_path)
    annotations.write_text("val_0.JPEG\tn01\nval_9.JPEG\tn02\n")  # names an image that is not there
    with pytest.raises(ValueError, match=r"val_9.JPEG: image file not found"):
        get_datasets("tiny_imagenet", root=tmp_path)


def test_imagefolder_scales_16_bit_images_refuses_float_ones_and_skips_hidden_files(tmp_path):
    for split in ("train", "test"):
        for name, value in (("dark", 4112), ("light", 60395)):  # 16 and 235 in 8 bits
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(np.full((8, 8), value, np.uint16)).save(tmp_path / split / name / "0.png")
    hidden = tmp_path / "train" / "dark" / ".ipynb_checkpoints"
    hidden.mkdir()
    save_solid(hidden / "0-checkpoint.png", (1, 2, 3), (8, 8))
    (tmp_path / "train" / "dark" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    train, _ = get_datasets("imagefolder", root=tmp_path, image_size=8)
    assert train.labels.tolist() == [0, 1]
    assert train.images[:, :, 4, 4].tolist() == [[16] * 3, [235] * 3]
    bad = tmp_path / "train" / "light" / "1.tif"
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(bad)
    with pytest.raises(ValueError, match="floating-point pixels") as error:
        get_datasets("imagefolder", root=tmp_path, image_size=8)
    assert str(error.value).startswith(f"{bad}:")
