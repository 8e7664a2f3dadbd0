"""Dataset files on disk (IDX, CIFAR pickles, image folders) and the dataset registry."""

from __future__ import annotations

import contextlib
import gzip
import inspect
import logging
import math
import os
import pickle
import typing
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .dataset import ImageDataset
from .tensors import channel_stats, convert_channels, resize_images, stratified_subset

log = logging.getLogger(__name__)

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def default_root() -> Path:
    """Where datasets are looked for (and downloaded to) when no root is given."""
    return Path(os.environ.get("FEATKD_DATA", Path.home() / ".cache" / "featkd" / "data"))


@dataclass
class _Splits:
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: list[str]


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (unsigned-byte data, ``.gz`` or plain) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:  # truncated or damaged compressed data
        raise ValueError(f"{path}: not a readable IDX file ({err})") from None
    magic = int.from_bytes(raw[:4], "big")
    type_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if len(raw) < 4 or magic >> 16 != 0 or type_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic})")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: cut off inside its header ({len(raw)} bytes for {ndim} dimensions)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


RESIZE_MODES = ("crop", "stretch")


def _fit_image(image: Any, size: int, resize: str) -> Any:
    """``crop``: shorter side to ``size`` (bilinear), then the centre square; ``stretch``: both sides to ``size``."""
    from PIL import Image

    if image.size == (size, size):
        return image
    if resize == "stretch":
        return image.resize((size, size), Image.BILINEAR)
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


class _UnsupportedImage(ValueError):
    """An image that decodes but whose pixel values have no fixed 8-bit mapping."""


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _as_rgb(image: Any, path: Path) -> Any:
    """``image`` as 8-bit RGB: 16-bit grey scaled by 255/65535 (PIL's own conversion clips it at 255)."""
    from PIL import Image

    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise _UnsupportedImage(f"{path}: {kind} pixels (PIL mode {image.mode}) have no fixed range; "
                                "convert the images to 8- or 16-bit")
    return image.convert("RGB")


def _read_image_files(paths: Sequence[Path], size: int, desc: str, resize: str = "crop") -> Tensor:
    """Decode image files to uint8 RGB (N, 3, size, size); a file that does not decode raises ValueError naming it."""
    from PIL import Image
    from tqdm.auto import tqdm

    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def read(i: int) -> None:
        try:
            with Image.open(paths[i]) as image:
                out[i] = np.asarray(_fit_image(_as_rgb(image, paths[i]), size, resize))
        except _UnsupportedImage:
            raise
        except FileNotFoundError:
            raise ValueError(f"{paths[i]}: image file not found") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{paths[i]}: cannot decode image (corrupt or truncated?): {reason}") from None

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes without holding the GIL
        for _ in tqdm(pool.map(read, range(len(paths))), total=len(paths), desc=desc,
                      disable=len(paths) < 2000, leave=False):
            pass
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, sorted; hidden files and folders (``._x.png``, ``.ipynb_checkpoints``) skipped."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


_DOWNLOAD_OPTION = "(--data-options download:true)"  # how the command line says download=True


def _torchvision_download(dataset_class: str, root: Path) -> None:
    import torchvision.datasets

    log.info("downloading %s to %s", dataset_class, root)
    getattr(torchvision.datasets, dataset_class)(str(root), train=True, download=True)


def _not_found(what: str, looked: Sequence[Path], layout: str, how: str) -> FileNotFoundError:
    places = ", ".join(str(p) for p in looked)
    return FileNotFoundError(f"{what} not found; looked in: {places}. Expected layout: {layout}. {how}")


# ----------------------------------------------------------------------------- loaders

def _load_digits(root: Path | None, download: bool, *, test_fraction: float = 0.2,
                 split_seed: int = 0) -> _Splits:
    from sklearn.datasets import load_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"digits: test_fraction must be between 0 and 1 (both excluded), got {test_fraction}")
    bunch = load_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0))).to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    test = stratified_subset(labels, round(test_fraction * len(labels)), split_seed)
    is_train = torch.ones(len(labels), dtype=torch.bool)
    is_train[test] = False
    return _Splits(images[is_train], labels[is_train], images[test], labels[test],
                   [str(c) for c in range(10)])


FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]


def _load_fashion_mnist(root: Path | None, download: bool, *, pad: int = 2) -> _Splits:
    base = root or default_root()
    looked = ([root, root / "FashionMNIST" / "raw", root / "fashion-mnist"] if root
              else [FASHION_MNIST_SYSTEM_DIR, base / "FashionMNIST" / "raw"])
    complete = [d for d in looked if all(_idx_file(d, s) for s in FASHION_MNIST_FILES)]
    if not complete and download:
        _torchvision_download("FashionMNIST", base)
        downloaded = base / "FashionMNIST" / "raw"
        complete = [downloaded] if all(_idx_file(downloaded, s) for s in FASHION_MNIST_FILES) else []
    if not complete:
        raise _not_found("Fashion-MNIST IDX files", looked,
                         f"{', '.join(FASHION_MNIST_FILES)} (each .gz or uncompressed) in one folder",
                         "Install them with `apt-get install dataset-fashion-mnist` (puts them in "
                         f"{FASHION_MNIST_SYSTEM_DIR}), pass root=<that folder> (--data-root), or use download=True "
                         f"{_DOWNLOAD_OPTION} where a network exists.")
    folder, classes = complete[0], len(FASHION_MNIST_CLASSES)
    splits = [_read_idx_pair(_idx_file(folder, images), _idx_file(folder, labels), classes)
              for images, labels in zip(FASHION_MNIST_FILES[0::2], FASHION_MNIST_FILES[1::2])]
    images = [F.pad(torch.from_numpy(array.copy()).unsqueeze(1), (pad,) * 4) for array, _ in splits]
    labels = [torch.from_numpy(array.astype(np.int64)) for _, array in splits]
    return _Splits(images[0], labels[0], images[1], labels[1], list(FASHION_MNIST_CLASSES))


def _read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) and labels (N,) in 0..num_classes-1 from two IDX files; ValueError naming the
    file that does not fit."""
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: holds an array of shape {images.shape}, not images (N, H, W)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{labels_path}: holds an array of shape {labels.shape}, not {len(images)} labels "
                         f"for the images of {images_path.name}")
    outside = labels[labels >= num_classes]
    if outside.size:
        raise ValueError(f"{labels_path}: holds {outside.size} label(s) outside 0..{num_classes - 1} "
                         f"(e.g. {int(outside[0])})")
    return images, labels


_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], label_key="labels", meta="batches.meta",
                    names_key="label_names", torchvision="CIFAR10"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], label_key="fine_labels",
                     meta="meta", names_key="fine_label_names", torchvision="CIFAR100"),
}


def _numpy_function(module: str, name: str) -> Callable[[], Any]:
    def resolve() -> Any:
        import importlib

        for package in ("numpy._core", "numpy.core"):  # numpy 2, numpy 1
            try:
                return getattr(importlib.import_module(f"{package}.{module}"), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"numpy has no {module}.{name}")

    return resolve


# The only globals a CIFAR python batch may name: numpy arrays, scalars and their dtypes,
# and the codec Python 3 uses for bytes in protocol-2 pickles. Everything else is refused.
_CIFAR_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("codecs").encode,
    **{(f"{package}.multiarray", name): _numpy_function("multiarray", name)
       for package in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")},
    **{(f"{package}.numeric", "_frombuffer"): _numpy_function("numeric", "_frombuffer")
       for package in ("numpy.core", "numpy._core")},
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle naming a global outside :data:`_CIFAR_GLOBALS`."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds dicts, lists, numbers, text, bytes and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return allowed()


def _unpickle(path: Path) -> dict[str, Any]:
    """A CIFAR python batch, read without running code from the file."""
    try:
        with open(path, "rb") as f:
            entry = _RestrictedUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as err:
        raise ValueError(f"{path}: refused to unpickle {err}: CIFAR batches hold only dicts, lists, bytes "
                         "and numpy arrays, and featkd never runs code from a data file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise ValueError(f"{path}: not a readable CIFAR python batch ({type(err).__name__}: {err})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (holds a {type(entry).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) and labels (N,) of one CIFAR python batch; ValueError naming ``path`` if they
    do not fit."""
    entry = _unpickle(path)
    missing = [key for key in ("data", label_key) if key not in entry]
    if missing:
        raise ValueError(f"{path}: not a CIFAR batch (no {' or '.join(map(repr, missing))} entry)")
    try:
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{path}: not a CIFAR batch ({type(err).__name__}: {err})") from None
    pixels = 3 * 32 * 32
    # rows of 3072 bytes (the files' layout) or (N, 3, 32, 32); (N, 32, 32, 3) would scramble the colours
    if data.ndim < 1 or data.size % pixels or data.shape[1:] not in ((), (pixels,), (3, 32, 32)):
        raise ValueError(f"{path}: 'data' has shape {data.shape}, not rows of {pixels} bytes (3x32x32 images)")
    images = data.reshape(-1, 3, 32, 32)
    if labels.size != len(images):
        raise ValueError(f"{path}: {labels.size} {label_key} for {len(images)} images")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
        raise ValueError(f"{path}: {label_key} holds {outside.size} value(s) outside 0..{num_classes - 1} "
                         f"(e.g. {int(outside[0])})")
    return images, labels


def _read_cifar_batches(paths: Sequence[Path], label_key: str, num_classes: int) -> tuple[Tensor, Tensor]:
    batches = [_read_cifar_batch(p, label_key, num_classes) for p in paths]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _cifar_class_names(path: Path, key: str, num_classes: int) -> list[str]:
    names = _unpickle(path).get(key)
    if not isinstance(names, (list, tuple)) or len(names) != num_classes:
        found = f"{len(names)} names" if isinstance(names, (list, tuple)) else "none"
        raise ValueError(f"{path}: {key!r} should hold the {num_classes} class names; found {found}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _load_cifar(root: Path | None, download: bool, variant: str) -> _Splits:
    info = _CIFAR[variant]
    base = root or default_root()
    looked = [base / info["folder"], base] if root else [base / info["folder"]]
    needed = info["train"] + info["test"]
    complete = [d for d in looked if all((d / n).is_file() for n in needed)]
    if not complete and download:
        _torchvision_download(info["torchvision"], base)
        complete = [base / info["folder"]]
    if not complete:
        raise _not_found(f"{variant} pickle batches", looked,
                         f"{info['folder']}/{{{', '.join(needed)}, {info['meta']}}}",
                         "Pass root=<folder holding that directory> (--data-root; the python version from "
                         "https://www.cs.toronto.edu/~kriz/cifar.html), "
                         f"or download=True {_DOWNLOAD_OPTION} where a network exists.")
    folder = complete[0]
    num_classes = 10 if variant == "cifar10" else 100
    train_x, train_y = _read_cifar_batches([folder / n for n in info["train"]], info["label_key"], num_classes)
    test_x, test_y = _read_cifar_batches([folder / n for n in info["test"]], info["label_key"], num_classes)
    classes = [str(c) for c in range(num_classes)]
    if (folder / info["meta"]).is_file():
        classes = _cifar_class_names(folder / info["meta"], info["names_key"], num_classes)
    return _Splits(train_x, train_y, test_x, test_y, classes)


def _load_cifar10(root: Path | None, download: bool) -> _Splits:
    return _load_cifar(root, download, "cifar10")


def _load_cifar100(root: Path | None, download: bool) -> _Splits:
    return _load_cifar(root, download, "cifar100")


def _load_tiny_imagenet(root: Path | None, download: bool) -> _Splits:
    base = root or default_root()
    looked = [base / "tiny-imagenet-200", base] if root else [base / "tiny-imagenet-200"]

    def complete(d: Path) -> bool:
        return ((d / "wnids.txt").is_file() and (d / "train").is_dir()
                and (d / "val" / "val_annotations.txt").is_file())

    found = [d for d in looked if complete(d)]
    if not found and download:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(TINY_IMAGENET_URL, str(base))
        found = [d for d in [base / "tiny-imagenet-200"] if complete(d)]
    if not found:
        raise _not_found("TinyImageNet", looked,
                         "tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
                         "val/val_annotations.txt}",
                         f"Unzip {TINY_IMAGENET_URL} under root (--data-root), "
                         f"or use download=True {_DOWNLOAD_OPTION} where a network exists.")
    folder = found[0]
    wnids = (folder / "wnids.txt").read_text().split()
    class_of = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for wnid in wnids:
        files = _image_files(folder / "train" / wnid / "images")
        if not files:
            raise ValueError(f"{folder / 'train' / wnid / 'images'}: no training images for class {wnid!r} "
                             "of wnids.txt")
        train_paths += files
        train_labels += [class_of[wnid]] * len(files)
    test_paths, test_labels = [], []
    annotations = folder / "val" / "val_annotations.txt"
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if line.strip():
            fields = line.split()
            if len(fields) < 2:
                raise ValueError(f"{annotations}, line {number}: expected '<file> <wnid> ...', got {line!r}")
            file_name, wnid = fields[:2]
            if wnid not in class_of:
                raise ValueError(f"{annotations}, line {number}: {wnid!r} is not in wnids.txt")
            test_paths.append(folder / "val" / "images" / file_name)
            test_labels.append(class_of[wnid])
    return _Splits(_read_image_files(train_paths, 64, "tiny_imagenet train"), torch.tensor(train_labels),
                   _read_image_files(test_paths, 64, "tiny_imagenet val"), torch.tensor(test_labels), wnids)


def _class_folders(folder: Path) -> list[Path]:
    """Sub-folders of ``folder``, sorted; hidden ones (``.ipynb_checkpoints``) are not classes."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan_class_folders(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for sub in _class_folders(folder):
        if sub.name not in classes:
            raise ValueError(f"{sub}: class {sub.name!r} has no training folder; classes: {classes}")
        files = _image_files(sub)
        if not files:
            raise ValueError(f"{sub}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                             "add images or remove the folder")
        paths += files
        labels += [classes.index(sub.name)] * len(files)
    return paths, labels


def _load_imagefolder(root: Path | None, download: bool, *, image_size: int = 32,
                      resize: str = "crop") -> _Splits:
    layout = "root/train/<class>/<image> and root/test/<class>/<image> (or root/val/...)"
    if root is None:
        raise ValueError(f"imagefolder needs root=...; expected layout: {layout}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"imagefolder resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")
    test_dirs = [root / "test", root / "val"]
    test_dir = next((d for d in test_dirs if d.is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise _not_found("image folders", [root / "train", *test_dirs], layout,
                         "Arrange the images that way.")
    classes = [d.name for d in _class_folders(root / "train")]
    if not classes:
        raise ValueError(f"{root / 'train'} holds no class folders; expected layout: {layout}")
    train_paths, train_labels = _scan_class_folders(root / "train", classes)
    test_paths, test_labels = _scan_class_folders(test_dir, classes)
    return _Splits(_read_image_files(train_paths, image_size, "imagefolder train", resize),
                   torch.tensor(train_labels),
                   _read_image_files(test_paths, image_size, "imagefolder test", resize),
                   torch.tensor(test_labels), classes)


def _load_synthetic(root: Path | None, download: bool, *, num_classes: int = 10, samples_per_class: int = 20,
                    test_per_class: int = 10, image_size: int = 32, in_channels: int = 3, seed: int = 0,
                    noise: float = 0.25) -> _Splits:
    counts = {"num_classes": num_classes, "samples_per_class": samples_per_class, "test_per_class": test_per_class}
    if min(counts.values()) < 1:
        raise ValueError(f"synthetic: {', '.join(f'{k}={v}' for k, v in counts.items() if v < 1)}: must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, in_channels, 4, 4, generator=generator)
    templates = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        noisy = templates[labels] + noise * torch.randn(labels.numel(), in_channels, image_size, image_size,
                                                        generator=generator)
        return noisy.clamp(0, 1).mul(255).round().to(torch.uint8), labels

    train, test = draw(samples_per_class), draw(test_per_class)
    return _Splits(*train, *test, [f"class{c}" for c in range(num_classes)])


@dataclass(frozen=True)
class _DatasetSpec:
    loader: Callable[..., _Splits]
    default_image_size: int | None  # resize to this when image_size is not given


_DATASETS: dict[str, _DatasetSpec] = {
    "digits": _DatasetSpec(_load_digits, 32),
    "fashion_mnist": _DatasetSpec(_load_fashion_mnist, None),
    "cifar10": _DatasetSpec(_load_cifar10, None),
    "cifar100": _DatasetSpec(_load_cifar100, None),
    "tiny_imagenet": _DatasetSpec(_load_tiny_imagenet, None),
    "imagefolder": _DatasetSpec(_load_imagefolder, None),
    "synthetic": _DatasetSpec(_load_synthetic, None),
}
_ALIASES = {"fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist",
            "cifar-10": "cifar10", "cifar-100": "cifar100", "tiny-imagenet": "tiny_imagenet",
            "tinyimagenet": "tiny_imagenet", "image_folder": "imagefolder"}


#: ``data`` of a run on images given in Python that no loader gives again (a subset, tensors of your own)
IN_MEMORY_DATA = "in-memory"


def list_datasets() -> list[str]:
    """Names accepted by :func:`get_datasets`."""
    return sorted(_DATASETS)


class DataSplits(NamedTuple):
    """Training, validation (None when not held out) and test splits of one dataset."""

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset


def get_datasets(name: str, root: str | Path | None = None, download: bool = False,
                 image_size: int | None = None, augment: bool = False, *, in_channels: int | None = None,
                 train_limit: int | None = None, seed: int = 0,
                 **kw: Any) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) ImageDatasets of a registered dataset; :func:`load_splits` without a validation split."""
    splits = load_splits(name, root, download, image_size, augment, in_channels=in_channels,
                         train_limit=train_limit, seed=seed, **kw)
    return splits.train, splits.test


#: load_splits arguments that featkd's commands set from settings of their own (argument: setting)
_SETTING_OF = {"name": "data", "root": "data_root", "image_size": "image_size", "augment": "augment",
               "train_limit": "train_limit", "seed": "data_seed", "val_size": "val_size"}


def check_data_options(options: Mapping[str, Any], passed: Iterable[str] = tuple(_SETTING_OF)) -> None:
    """ValueError when dataset options (``--data-options``, a config's ``data_options``) name an
    argument of :func:`load_splits` that the caller ``passed`` from a featkd setting (seed,
    train_limit, ...)."""
    own = sorted(set(options) & set(passed))
    if own:
        settings = ", ".join(f"--{_SETTING_OF[name].replace('_', '-')}" for name in own)
        raise ValueError(f"data options {own} are not dataset options: use {settings} (or its config key)")


def _typed_options(key: str, loader: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` checked against the loader's declared types (ValueError naming a misfit); a float
    written as text that YAML leaves a string (``1e-1``) is read as a float."""
    hints = typing.get_type_hints(loader)
    typed = dict(options)
    for name, value in options.items():
        expected = hints.get(name)
        if expected is float and isinstance(value, str):
            with contextlib.suppress(ValueError):
                typed[name] = value = float(value)
        accepted = (int, float) if expected is float else (expected,)
        if expected in (int, float, bool, str) and (
                not isinstance(value, accepted) or (expected is not bool and isinstance(value, bool))):
            raise ValueError(f"dataset {key!r}: option {name} must be {expected.__name__}, got {value!r}")
    return typed


def load_splits(name: str, root: str | Path | None = None, download: bool = False,
                image_size: int | None = None, augment: bool = False, *, in_channels: int | None = None,
                train_limit: int | None = None, seed: int = 0, val_size: int | None = None,
                val_seed: int = 0, **kw: Any) -> DataSplits:
    """Train, validation and test ImageDatasets of a registered dataset; see the module docstring.

    ``val_size`` holds out a stratified validation split of the training split, drawn with
    ``val_seed`` (fixed, so teachers and students of one benchmark share it) before anything
    else; ``train_limit`` then keeps a seeded stratified subset (class-balanced on balanced data)
    of the remaining training images. ``image_size`` resizes (bilinear); ``in_channels`` repeats
    grey channels (or takes luminance). The normalisation statistics are those of the kept
    training images, for every split. ``augment`` applies to the training split only. Other
    keywords go to the dataset's loader.
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key == IN_MEMORY_DATA:
        raise ValueError(f"data {IN_MEMORY_DATA} stands for images given in Python, which loading data does not "
                         "give again: name a dataset (data=, --data)")
    if key not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {list_datasets()}")
    spec = _DATASETS[key]
    options = [p for p in inspect.signature(spec.loader).parameters if p not in ("root", "download")]
    unknown = sorted(set(kw) - set(options))
    if unknown:
        valid = sorted({*options, "in_channels"} - set(_SETTING_OF))  # image_size, seed, ...: settings of their own
        raise ValueError(f"unknown option(s) {unknown} for dataset {key!r}; valid: {valid}")
    kw = _typed_options(key, spec.loader, kw)
    # what loads these splits again, in TrainConfig's terms (kept on each split as ``source``)
    given = {**kw, "in_channels": in_channels} if in_channels is not None else dict(kw)
    source = {"data": key, "data_root": str(Path(root).expanduser()) if root is not None else None,
              "image_size": image_size, "data_options": given, "train_limit": train_limit,
              "data_seed": seed, "val_size": val_size, "val_seed": val_seed}
    for option, value in (("image_size", image_size), ("in_channels", in_channels), ("seed", seed)):
        if option in options and value is not None:
            kw[option] = value
    splits = spec.loader(Path(root).expanduser() if root is not None else None, download, **kw)
    empty = [split for split, labels in (("training", splits.train_labels), ("test", splits.test_labels))
             if labels.numel() == 0]
    if empty:
        where = f" in {root}" if root is not None else ""
        raise ValueError(f"dataset {key!r}{where} has no {' and no '.join(empty)} images")
    train_x, test_x = splits.train_images, splits.test_images
    size = image_size or spec.default_image_size
    if size is not None and "image_size" not in options:
        train_x, test_x = resize_images(train_x, size), resize_images(test_x, size)
    if in_channels is not None and "in_channels" not in options:
        train_x, test_x = convert_channels(train_x, in_channels), convert_channels(test_x, in_channels)
    train_y = splits.train_labels
    val_x = val_y = None
    if val_size is not None:
        if not 1 <= val_size < train_y.numel():
            raise ValueError(f"val_size must be in [1, {train_y.numel() - 1}] for {key}'s "
                             f"{train_y.numel()} training images, got {val_size}")
        held = torch.zeros(train_y.numel(), dtype=torch.bool)
        held[stratified_subset(train_y, val_size, val_seed)] = True
        val_x, val_y = train_x[held], train_y[held]
        train_x, train_y = train_x[~held], train_y[~held]
    if train_limit is not None:
        if not 1 <= train_limit <= train_y.numel():
            held_out = " left after the validation split" if val_size is not None else ""
            raise ValueError(f"train_limit must be in [1, {train_y.numel()}] for {key}'s {train_y.numel()} "
                             f"training images{held_out}, got {train_limit}")
        keep = stratified_subset(train_y, train_limit, seed)
        train_x, train_y = train_x[keep], train_y[keep]
    mean, std = channel_stats(train_x)

    def split(images: Tensor, labels: Tensor, name: str, augmented: bool) -> ImageDataset:
        return ImageDataset(images, labels, splits.classes, mean, std, augmented, name=f"{key}/{name}",
                            source={**source, "split": name})

    train = split(train_x, train_y, "train", augment)
    val = split(val_x, val_y, "val", False) if val_x is not None else None
    test = split(test_x, splits.test_labels, "test", False)
    log.info("loaded %s: %d train, %d validation, %d test, shape %s, %d classes", key, len(train),
             len(val) if val is not None else 0, len(test), train.image_shape, train.num_classes)
    return DataSplits(train, val, test)
