"""Data: dataset parsers, synthetic data, the uint8 image cache, the PxK sampler, augmentation."""

from ccreid_jax.data.augment import (
  ERASE_VALUES,
  IMAGENET_MEAN,
  IMAGENET_STD,
  AugmentParams,
  apply_augment,
  normalize,
  sample_augment_params,
  test_transform,
  train_augment,
)
from ccreid_jax.data.cache import ImageDecodeError, cache_file_name, decode_image, load_image_cache
from ccreid_jax.data.datasets import (
  DATASET_NAMES,
  DatasetError,
  Record,
  ReidDataset,
  dataset_folder_name,
  load_dataset,
)
from ccreid_jax.data.sampler import CameraAwarePKSampler

# The synthetic-data names are imported on first use (PEP 562), so that
# ``python -m ccreid_jax.data.synthetic`` does not import its own module twice.
_SYNTHETIC_NAMES = (
  "FAKE_TREE_CAMERAS",
  "fake_tree_sizes",
  "generate_market_dataset",
  "make_fake_tree",
)


def __getattr__(name: str):
  if name in _SYNTHETIC_NAMES:
    from ccreid_jax.data import synthetic

    return getattr(synthetic, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
  "DATASET_NAMES",
  "ERASE_VALUES",
  "FAKE_TREE_CAMERAS",
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "AugmentParams",
  "CameraAwarePKSampler",
  "DatasetError",
  "ImageDecodeError",
  "Record",
  "ReidDataset",
  "apply_augment",
  "cache_file_name",
  "dataset_folder_name",
  "decode_image",
  "fake_tree_sizes",
  "generate_market_dataset",
  "load_dataset",
  "load_image_cache",
  "make_fake_tree",
  "normalize",
  "sample_augment_params",
  "test_transform",
  "train_augment",
]


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_SYNTHETIC_NAMES))
