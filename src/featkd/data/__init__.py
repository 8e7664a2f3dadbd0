"""Image datasets held in memory as uint8 tensors, with vectorised per-sample augmentation.

Every dataset loads whole into an :class:`ImageDataset`: a uint8 tensor (N, C, H, W) and
int64 labels. Normalisation uses the per-channel mean/std of the *training* split (in [0, 1]
pixel units) for both splits. Batches are built by tensor indexing (:meth:`ImageDataset.batch`):
a random crop with zero padding 4 and a horizontal flip are drawn per sample, without a
Python loop over samples. Zero padding is applied to raw pixels before normalising, as
torchvision does on PIL images.

A validation split (``load_splits(name, val_size=N)``) is held out of the training data with a
fixed seed, before ``train_limit`` subsets the rest; it serves every choice (best epoch,
learning rate, layers), the test split none.

Datasets (``get_datasets(name, ...)``; ``root`` defaults to ``$FEATKD_DATA`` or
``~/.cache/featkd/data``):

* ``digits``: scikit-learn's bundled 8x8 digits (0..16 scaled to 0..255), bilinear-upsampled
  to 32x32; a stratified 80/20 train/test split with seed 0 (``test_fraction``, ``split_seed``).
* ``fashion_mnist``: IDX files (``.gz`` or plain), zero-padded 28 -> 32 (``pad=2``). Looked up in
  /usr/share/datasets/fashion-mnist (``apt-get install dataset-fashion-mnist``) when no root is given.
* ``cifar10`` / ``cifar100``: the python pickle batches (``cifar-10-batches-py``, ``cifar-100-python``),
  read by a restricted unpickler that builds only containers, bytes and numpy arrays (a file naming
  any other global is refused, so a crafted file cannot run code).
* ``tiny_imagenet``: the ``tiny-imagenet-200`` folder, 64x64 RGB; its val split is the test split.
* ``imagefolder``: ``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``val``), RGB,
  ``image_size`` square (default 32): the shorter side is resized and the centre cropped
  (``resize="stretch"`` resizes both sides instead). A file that does not decode, or a class
  folder without images, is an error naming it; hidden folders are not classes and hidden files
  (``._x.png``, ``.ipynb_checkpoints/``) are not images. 16-bit grey images are scaled to 8 bits;
  32-bit integer or float images are refused.
* ``synthetic``: one smooth random template per class plus seeded noise, for tests.

``download=True`` fetches CIFAR and Fashion-MNIST with torchvision (TinyImageNet with torchvision's
archive helper) where a network exists; without files a FileNotFoundError says where it looked.
"""

from .dataset import BatchLoader, ImageDataset
from .sources import (
    IN_MEMORY_DATA,
    DataSplits,
    check_data_options,
    default_root,
    get_datasets,
    list_datasets,
    load_splits,
)
from .tensors import (
    CROP_PADDING,
    channel_stats,
    class_balanced_subset,
    convert_channels,
    derive_generator,
    normalize,
    random_crop_flip,
    resize_images,
    stratified_subset,
)

__all__ = [
    "CROP_PADDING", "IN_MEMORY_DATA", "BatchLoader", "DataSplits", "ImageDataset", "channel_stats",
    "class_balanced_subset", "check_data_options", "convert_channels", "default_root", "derive_generator",
    "get_datasets", "list_datasets", "load_splits", "normalize", "random_crop_flip", "resize_images",
    "stratified_subset",
]
