"""Train / test transforms vs a torch transcription of the reference's torchvision pipeline.

Pixels: with the random parameters fixed, ``apply_augment`` equals flip -> Pad(10) with
zeros -> crop at the offsets -> ToTensor -> Normalize -> erase with the constants written
after normalisation. Distributions: ``sample_augment_params`` draws what the reference's
samplers draw (torch.rand / torch.randint for flip and crop, Python ``random`` for erasing);
the streams differ, so histograms are compared with a two-sample chi-square test.
"""

import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ccreid_jax.data import augment

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.parity

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PAD = 10


def torch_to_normalised(image):
  """ToTensor + Normalize of a uint8 (H, W, 3) tensor -> float32 (3, H, W)."""
  x = image.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
  mean = torch.tensor(MEAN).view(3, 1, 1)
  std = torch.tensor(STD).view(3, 1, 1)
  return x.sub(mean).div(std)


def torch_train_transform(image, flip, crop_y, crop_x, erase_box):
  """The reference order on one uint8 (H, W, 3) image; ``erase_box`` None = not erased."""
  height, width = image.shape[:2]
  if flip:
    image = image.flip(1)
  padded = torch.nn.functional.pad(image.permute(2, 0, 1), (PAD, PAD, PAD, PAD))  # zeros
  cropped = padded[:, crop_y : crop_y + height, crop_x : crop_x + width].permute(1, 2, 0)
  x = torch_to_normalised(cropped)
  if erase_box is not None:
    top, left, h, w = erase_box
    for c in range(3):
      x[c, top : top + h, left : left + w] = MEAN[c]
  return x.permute(1, 2, 0).numpy()


def test_apply_augment_matches_torch_pixel_for_pixel():
  rng = np.random.default_rng(0)
  height, width = 24, 12
  images = rng.integers(0, 256, size=(5, height, width, 3), dtype=np.uint8)
  flip = np.array([True, False, True, False, True])
  crop_y = np.array([0, 20, 7, 10, 3], np.int32)
  crop_x = np.array([20, 0, 13, 10, 19], np.int32)
  erase = np.array([True, True, False, True, True])
  boxes = np.array(
    [
      [0, 0, 5, 3],  # top-left corner
      [19, 9, 5, 3],  # bottom-right corner
      [0, 0, 0, 0],  # not erased
      [4, 2, 14, 8],
      [10, 0, 1, 11],
    ],
    np.int32,
  )
  params = augment.AugmentParams(
    flip=jnp.asarray(flip),
    crop_y=jnp.asarray(crop_y),
    crop_x=jnp.asarray(crop_x),
    erase=jnp.asarray(erase),
    erase_box=jnp.asarray(boxes),
  )
  got = np.asarray(augment.apply_augment(jnp.asarray(images), params, pad=PAD))
  for b in range(len(images)):
    want = torch_train_transform(
      torch.tensor(images[b]), flip[b], crop_y[b], crop_x[b], tuple(boxes[b]) if erase[b] else None
    )
    np.testing.assert_allclose(got[b], want, rtol=0, atol=1e-5, err_msg=f"image {b}")


def test_test_transform_matches_torch():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(3, 16, 8, 3), dtype=np.uint8)
  got = np.asarray(augment.test_transform(jnp.asarray(images)))
  for b in range(3):
    want = torch_to_normalised(torch.tensor(images[b])).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got[b], want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ distributions


def reference_params(
  n, height, width, seed, *, area=(0.02, 0.4), aspect=0.3, crop_max=2 * PAD, erasing_prob=0.5
):
  """The reference's samplers, one image at a time (torchvision RandomHorizontalFlip,
  RandomCrop after Pad(10), and the reference's RandomErasing loop)."""
  torch.manual_seed(seed)
  py = random.Random(seed)
  flips, ys, xs, erased, boxes = [], [], [], [], []
  for _ in range(n):
    flips.append(bool(torch.rand(1) < 0.5))
    ys.append(int(torch.randint(0, crop_max + 1, size=(1,))))
    xs.append(int(torch.randint(0, crop_max + 1, size=(1,))))
    box = None
    if py.uniform(0, 1) < erasing_prob:
      for _ in range(100):
        target = py.uniform(*area) * height * width
        ratio = py.uniform(aspect, 1 / aspect)
        h = int(round(math.sqrt(target * ratio)))
        w = int(round(math.sqrt(target / ratio)))
        if w < width and h < height:
          box = (py.randint(0, height - h), py.randint(0, width - w), h, w)
          break
    erased.append(box is not None)
    if box is not None:
      boxes.append(box)
  return (
    np.array(flips),
    np.array(ys),
    np.array(xs),
    np.array(erased),
    np.array(boxes).reshape(-1, 4),
  )


def chi2_same_distribution(a, b, bins):
  """p-value of a two-sample chi-square test that samples ``a`` and ``b`` share a histogram."""
  ha, _ = np.histogram(a, bins=bins)
  hb, _ = np.histogram(b, bins=bins)
  keep = (ha + hb) > 0
  ha, hb = ha[keep].astype(float), hb[keep].astype(float)
  na, nb = ha.sum(), hb.sum()
  stat = np.sum((np.sqrt(nb / na) * ha - np.sqrt(na / nb) * hb) ** 2 / (ha + hb))
  return stats.chi2.sf(stat, max(int(keep.sum()) - 1, 1))


def distributions_agree(ours, ref, height, width, min_p=1e-3):
  """Names of the statistics whose distributions differ (empty when everything agrees)."""
  flip, crop_y, crop_x, erased, boxes = ours
  r_flip, r_y, r_x, r_erased, r_boxes = ref
  bad = []
  for name, a, b in (("flip", flip, r_flip), ("erased", erased, r_erased)):
    if chi2_same_distribution(a.astype(int), b.astype(int), bins=[-0.5, 0.5, 1.5]) < min_p:
      bad.append(name)
  offsets = np.arange(-0.5, 2 * PAD + 1.5)  # one bin per integer offset 0..20 (and 21)
  for name, a, b in (("crop_y", crop_y, r_y), ("crop_x", crop_x, r_x)):
    if chi2_same_distribution(a, b, offsets) < min_p:
      bad.append(name)
  h, w, r_h, r_w = boxes[:, 2], boxes[:, 3], r_boxes[:, 2], r_boxes[:, 3]
  derived = {
    "area": (h * w / (height * width), r_h * r_w / (height * width), np.linspace(0, 0.45, 19)),
    "aspect": (np.log(h / w), np.log(r_h / r_w), np.linspace(-1.3, 1.3, 21)),
    "height": (h, r_h, np.linspace(0, height, 17)),
    "width": (w, r_w, np.linspace(0, width, 17)),
    # Box position as a fraction of its free range [0, H - h] / [0, W - w].
    "top": (
      boxes[:, 0] / np.maximum(height - h, 1),
      r_boxes[:, 0] / np.maximum(height - r_h, 1),
      np.linspace(0, 1.0001, 11),
    ),
    "left": (
      boxes[:, 1] / np.maximum(width - w, 1),
      r_boxes[:, 1] / np.maximum(width - r_w, 1),
      np.linspace(0, 1.0001, 11),
    ),
  }
  for name, (a, b, bins) in derived.items():
    if chi2_same_distribution(a, b, bins) < min_p:
      bad.append(name)
  return bad


def our_params(n, height, width, seed):
  p = augment.sample_augment_params(jax.random.PRNGKey(seed), n, height, width)
  erased = np.asarray(p.erase)
  return (
    np.asarray(p.flip),
    np.asarray(p.crop_y),
    np.asarray(p.crop_x),
    erased,
    np.asarray(p.erase_box)[erased],
  )


def test_sampled_parameters_follow_the_reference_distributions():
  height, width, n = 256, 128, 12000
  ours = our_params(n, height, width, seed=0)
  ref = reference_params(n, height, width, seed=0)
  boxes = ours[4]
  assert (boxes[:, 0] + boxes[:, 2] <= height).all() and (boxes[:, 1] + boxes[:, 3] <= width).all()
  assert (boxes[:, 2] < height).all() and (boxes[:, 3] < width).all()
  assert ours[1].min() == 0 and ours[1].max() == 2 * PAD
  assert distributions_agree(ours, ref, height, width) == []
