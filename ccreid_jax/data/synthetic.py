"""Synthetic data in the real dataset layouts.

Two tools:

* ``generate_market_dataset`` renders a small demo person re-ID dataset with numpy and writes it
  as JPEGs in the Market-1501 layout and file-name format. Identity lives in the clothing (shirt
  colour and pattern, trousers, shoes, hair, accessories); every camera adds its own background,
  colour cast, illumination ramp, scale and blur, and every image adds pose / position jitter,
  sometimes an occluder, and noise. Colours come from small palettes so many identities share
  attributes, which keeps the task from being trivial for an untrained network.
  By default the camera nuisance is mild and identity dominates the appearance.
  ``camera_shift`` (``--camera-shift``) adds a strong per-camera appearance on top, the
  camera shift that makes unsupervised clusters follow the cameras: a colour cast (the
  cameras' hues spread evenly over the colour circle), an exposure gain and a gamma, a
  tinted veil, the scene blended towards a camera colour, and extra blur or extra noise.
  Each camera's shift is drawn from the seed alone and scaled by the value; at 1.0 images of
  one camera look more alike than images of one person (clusters of random-init features
  are camera clusters) while the clothing still identifies the person. 0 (the default)
  writes exactly the files of a generator without the option.
* ``make_fake_tree`` writes tiny images in the folder layout and file-name format of each of the
  five supported datasets, for tests.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ccreid_jax.data.datasets import DATASET_NAMES, DatasetError, dataset_folder_name

__all__ = [
  "FAKE_TREE_CAMERAS",
  "fake_tree_sizes",
  "generate_market_dataset",
  "make_fake_tree",
]

_MARKER = ".synthetic.json"
_GENERATOR_VERSION = 4
_SPLIT_DIRS = ("bounding_box_train", "query", "bounding_box_test")

# Deliberately small palettes, with some near neighbours (navy / black / dark grey, red / maroon,
# beige / white), so that identities share attributes and camera colour casts confuse them.
_SHIRT_PALETTE = np.array(
  [
    [200, 30, 30],
    [120, 20, 30],
    [30, 60, 160],
    [25, 30, 60],
    [235, 235, 230],
    [30, 30, 30],
    [70, 70, 75],
    [40, 130, 60],
    [230, 200, 50],
    [210, 180, 140],
    [150, 60, 160],
    [240, 130, 40],
  ],
  dtype=np.float32,
)
_TROUSER_PALETTE = np.array(
  [
    [25, 25, 30],
    [40, 50, 90],
    [90, 90, 95],
    [190, 170, 130],
    [60, 45, 30],
    [200, 200, 200],
  ],
  dtype=np.float32,
)
_SHOE_PALETTE = np.array(
  [
    [20, 20, 20],
    [240, 240, 240],
    [110, 70, 40],
    [160, 30, 30],
  ],
  dtype=np.float32,
)
_HAIR_PALETTE = np.array(
  [
    [15, 12, 10],
    [70, 45, 25],
    [150, 110, 60],
    [200, 180, 120],
    [120, 120, 120],
  ],
  dtype=np.float32,
)
_SKIN_PALETTE = np.array(
  [
    [240, 200, 170],
    [210, 160, 120],
    [160, 110, 75],
    [100, 65, 45],
  ],
  dtype=np.float32,
)
_ACCESSORY_PALETTE = np.array(
  [
    [20, 20, 20],
    [150, 30, 30],
    [30, 60, 150],
    [130, 100, 60],
    [220, 220, 210],
    [60, 120, 60],
  ],
  dtype=np.float32,
)
_PATTERNS = ("plain", "hstripes", "vstripes", "checks", "logo", "jacket")


@dataclasses.dataclass(frozen=True)
class _Identity:
  """Appearance attributes shared by every image of one identity."""

  shirt: np.ndarray
  shirt2: np.ndarray
  pattern: int
  stripe_period: float  # as a fraction of the figure height
  long_sleeves: bool
  trousers: np.ndarray
  shorts: bool
  shoes: np.ndarray
  hair: np.ndarray
  long_hair: bool
  skin: np.ndarray
  hat: np.ndarray | None
  bag: np.ndarray | None
  bag_side: int
  backpack: np.ndarray | None
  build: float


@dataclasses.dataclass(frozen=True)
class _Camera:
  """Nuisance shared by every image taken by one camera."""

  background: np.ndarray  # (H + 2*margin, _SCENE_WIDTHS*W, 3) float32 scene, cropped per image
  gain: np.ndarray  # per-channel colour cast
  offset: float  # brightness offset
  ramp: np.ndarray  # (H, 1, 1) vertical illumination ramp
  scale: float  # figure height as a fraction of the image height
  blur: int  # box-blur radius in pixels
  noise: float  # Gaussian noise standard deviation
  back_view: float  # probability that a person is seen from behind
  # Only with ``camera_shift > 0`` (defaults: none), applied after the noise:
  gamma: float = 1.0  # tone curve 255 * (x / 255) ** gamma
  haze: float = 0.0  # weight of the blend towards ``haze_colour`` (a tinted veil)
  haze_colour: np.ndarray | None = None


_BG_MARGIN = 4
_MAX_CAMERA_SHIFT = 2.0
# A camera's scene is this many image widths wide; people appear at random places in it, so
# two images of one camera share the scene's style but not the same background pixels.
_SCENE_WIDTHS = 4


def _pick(rng: np.random.Generator, palette: np.ndarray) -> np.ndarray:
  return palette[rng.integers(len(palette))]


def _sample_identity(rng: np.random.Generator) -> _Identity:
  shirt_index = rng.integers(len(_SHIRT_PALETTE))
  second = (shirt_index + rng.integers(1, len(_SHIRT_PALETTE))) % len(_SHIRT_PALETTE)
  return _Identity(
    shirt=_SHIRT_PALETTE[shirt_index],
    shirt2=_SHIRT_PALETTE[second],
    pattern=int(rng.integers(len(_PATTERNS))),
    stripe_period=float(rng.uniform(0.04, 0.08)),
    long_sleeves=bool(rng.random() < 0.5),
    trousers=_pick(rng, _TROUSER_PALETTE),
    shorts=bool(rng.random() < 0.25),
    shoes=_pick(rng, _SHOE_PALETTE),
    hair=_pick(rng, _HAIR_PALETTE),
    long_hair=bool(rng.random() < 0.3),
    skin=_pick(rng, _SKIN_PALETTE),
    hat=_pick(rng, _ACCESSORY_PALETTE) if rng.random() < 0.2 else None,
    bag=_pick(rng, _ACCESSORY_PALETTE) if rng.random() < 0.3 else None,
    bag_side=int(rng.choice([-1, 1])),
    backpack=_pick(rng, _ACCESSORY_PALETTE) if rng.random() < 0.3 else None,
    build=float(rng.uniform(0.85, 1.15)),
  )


def _smooth_noise(
  rng: np.random.Generator, height: int, width: int, cells: tuple[int, int]
) -> np.ndarray:
  """Blocky low-frequency noise in [-1, 1] of shape (height, width)."""
  coarse = rng.uniform(-1.0, 1.0, size=cells)
  rows = np.minimum(np.arange(height) * cells[0] // height, cells[0] - 1)
  cols = np.minimum(np.arange(width) * cells[1] // width, cells[1] - 1)
  return coarse[rows][:, cols]


def _sample_camera(rng: np.random.Generator, height: int, width: int) -> _Camera:
  bh, bw = height + 2 * _BG_MARGIN, _SCENE_WIDTHS * width
  # Scenes are mostly grey with a tint (streets, walls, paving), less saturated than clothing.
  wall = rng.uniform(60, 200) + rng.uniform(-25, 25, size=3).astype(np.float32)
  floor = rng.uniform(50, 180) + rng.uniform(-20, 20, size=3).astype(np.float32)
  horizon = int(bh * rng.uniform(0.55, 0.85))
  background = np.empty((bh, bw, 3), np.float32)
  background[:horizon] = wall
  background[horizon:] = floor
  texture = int(rng.integers(3))
  if texture == 0:  # vertical panels (shop windows, doors)
    period = int(rng.integers(6, 20))
    panels = ((np.arange(bw) // period) % 2).astype(np.float32)
    background[:horizon] += (panels[None, :, None] - 0.5) * rng.uniform(20, 60)
  elif texture == 1:  # blotchy surfaces (trees, crowds, posters)
    blotches = _smooth_noise(
      rng, bh, bw, (int(rng.integers(4, 10)), _SCENE_WIDTHS * int(rng.integers(2, 6)))
    )
    background += blotches[..., None] * rng.uniform(20, 50, size=3).astype(np.float32)
  else:  # paving lines on the floor
    period = int(rng.integers(5, 12))
    lines = ((np.arange(bh) % period) == 0).astype(np.float32)
    background += (lines[:, None, None] * (np.arange(bh)[:, None, None] >= horizon)) * -40.0
  ramp_strength = rng.uniform(-0.35, 0.35)
  ramp = 1.0 + ramp_strength * (np.linspace(-0.5, 0.5, height, dtype=np.float32))
  return _Camera(
    background=background,
    gain=rng.uniform(0.88, 1.12, size=3).astype(np.float32),
    offset=float(rng.uniform(-10, 10)),
    ramp=ramp[:, None, None],
    scale=float(rng.uniform(0.8, 0.97)),
    blur=int(rng.choice([0, 0, 1, 1, 2])),
    noise=float(rng.uniform(2.0, 9.0)),
    back_view=float(rng.choice([0.0, 0.2, 0.8])),
  )


def _shift_camera(
  rng: np.random.Generator,
  camera: _Camera,
  index: int,
  num_cameras: int,
  phase: float,
  strength: float,
) -> _Camera:
  """``camera`` with the strong appearance of camera ``index`` of ``num_cameras``
  (``camera_shift``).

  The draws do not depend on ``strength`` (it scales them), so one seed gives every strength
  the same shift directions. The hues of the casts and backgrounds are spread evenly over the
  colour circle (starting at ``phase``), so no two cameras get the same tint.
  """
  hue = phase + 2.0 * np.pi * (index + rng.uniform(-0.2, 0.2)) / num_cameras
  channel_angles = 2.0 * np.pi * np.arange(3) / 3.0

  def tint(angle: float, depth: float) -> np.ndarray:  # unit brightness, hue ``angle``
    return (1.0 + depth * np.cos(angle - channel_angles)).astype(np.float32)

  cast = np.exp(strength * 0.34 * np.cos(hue - channel_angles))  # colour cast
  level = float(np.exp(strength * rng.uniform(-0.26, 0.26)))  # exposure
  gamma = float(np.exp(strength * rng.uniform(-0.34, 0.34)))
  scene_colour = rng.uniform(90, 170) * tint(hue + rng.uniform(1.5, 2.5), 0.6)
  scene_weight = min(0.9, 0.41 * strength)
  haze_colour = rng.uniform(120, 220) * tint(hue, 0.35)
  haze = min(0.6, strength * rng.uniform(0.075, 0.19))
  blurs = index % 2 == 0  # a soft camera (blur) or a grainy one (noise), alternately
  extra_blur = int(round(strength * rng.uniform(0.75, 1.5))) if blurs else 0
  extra_noise = 0.0 if blurs else strength * rng.uniform(4.5, 9.0)
  return dataclasses.replace(
    camera,
    background=camera.background * (1.0 - scene_weight) + scene_colour * scene_weight,
    gain=(camera.gain * cast * level).astype(np.float32),
    blur=camera.blur + extra_blur,
    noise=camera.noise + extra_noise,
    gamma=gamma,
    haze=haze,
    haze_colour=haze_colour,
  )


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
  """Separable box blur with edge padding (radius 0 returns the input)."""
  if radius <= 0:
    return image
  size = 2 * radius + 1
  out = image
  for axis in (0, 1):
    pad = [(0, 0)] * out.ndim
    pad[axis] = (radius + 1, radius)
    padded = np.pad(out, pad, mode="edge")
    csum = np.cumsum(padded, axis=axis, dtype=np.float32)
    hi = np.take(csum, np.arange(size, size + out.shape[axis]), axis=axis)
    lo = np.take(csum, np.arange(0, out.shape[axis]), axis=axis)
    out = (hi - lo) / size
  return out


def _render_person(
  rng: np.random.Generator,
  ident: _Identity,
  camera: _Camera,
  height: int,
  width: int,
  *,
  occlude_prob: float = 0.15,
  partial: bool = False,
) -> np.ndarray:
  """Render one uint8 (height, width, 3) image of ``ident`` seen by ``camera``."""
  dy = rng.integers(0, 2 * _BG_MARGIN + 1)
  dx = rng.integers(0, camera.background.shape[1] - width + 1)
  canvas = camera.background[dy : dy + height, dx : dx + width].copy()
  yy = np.arange(height, dtype=np.float32)[:, None]
  xx = np.arange(width, dtype=np.float32)[None, :]

  fh = camera.scale * height * rng.uniform(0.94, 1.04)
  top = (height - fh) / 2 + rng.uniform(-0.04, 0.04) * height
  cx = width / 2 + rng.uniform(-0.08, 0.08) * width
  bw = fh * 0.34 * ident.build  # body (torso) width
  stride = rng.uniform(-0.09, 0.09) * bw
  arm_swing = rng.uniform(-0.04, 0.04) * fh
  back = rng.random() < camera.back_view
  if partial:  # distractor-like bad detections: body cut by the frame
    top += rng.choice([-0.35, 0.35]) * fh

  def rows(a: float, b: float) -> np.ndarray:
    return (yy >= top + a * fh) & (yy < top + b * fh)

  def cols(a: float, b: float) -> np.ndarray:
    return (xx >= cx + a * bw) & (xx < cx + b * bw)

  def paint(mask: np.ndarray, colour: np.ndarray) -> None:
    canvas[mask] = colour

  # Legs and shoes.
  leg_rows = rows(0.52, 0.93)
  right_leg = leg_rows & (xx >= cx + 0.03 * bw - stride) & (xx < cx + 0.46 * bw - stride)
  left_leg = leg_rows & (xx >= cx - 0.46 * bw + stride) & (xx < cx - 0.03 * bw + stride)
  legs = left_leg | right_leg
  paint(legs, ident.trousers)
  if ident.shorts:
    paint(legs & rows(0.70, 0.93), ident.skin)
  shoe_rows = rows(0.93, 0.995)
  paint(shoe_rows & (xx >= cx - 0.52 * bw + stride) & (xx < cx - 0.02 * bw + stride), ident.shoes)
  paint(shoe_rows & (xx >= cx + 0.02 * bw - stride) & (xx < cx + 0.52 * bw - stride), ident.shoes)

  # Backpack body peeking out at the side (front view) or covering the back (back view).
  if ident.backpack is not None:
    if back:
      paint(rows(0.17, 0.45) & cols(-0.38, 0.38), ident.backpack)
    else:
      paint(rows(0.17, 0.42) & cols(0.48, 0.62), ident.backpack)

  # Torso with the shirt pattern.
  torso = rows(0.14, 0.53) & cols(-0.5, 0.5)
  paint(torso, ident.shirt)
  pattern = _PATTERNS[ident.pattern]
  period = max(ident.stripe_period * fh, 2.0)
  if pattern == "hstripes":
    paint(torso & (((yy - top) // period) % 2 == 1), ident.shirt2)
  elif pattern == "vstripes":
    paint(torso & (((xx - cx + 4 * period) // period) % 2 == 1), ident.shirt2)
  elif pattern == "checks":
    check = (((yy - top) // period) + ((xx - cx + 4 * period) // period)) % 2 == 1
    paint(torso & check, ident.shirt2)
  elif pattern == "logo" and not back:
    paint(rows(0.24, 0.36) & cols(-0.2, 0.2), ident.shirt2)
  elif pattern == "jacket":
    if back:
      paint(rows(0.45, 0.53) & cols(-0.5, 0.5), ident.shirt2)
    else:
      paint(rows(0.14, 0.53) & cols(-0.12, 0.12), ident.shirt2)
  if ident.backpack is not None and not back:  # straps
    paint(rows(0.14, 0.40) & (cols(-0.32, -0.2) | cols(0.2, 0.32)), ident.backpack)

  # Arms: sleeves then skin, swinging in opposite directions.
  for side, swing in ((-1, arm_swing), (1, -arm_swing)):
    arm_cols = cols(0.5, 0.72) if side > 0 else cols(-0.72, -0.5)
    sleeve_end = 0.49 if ident.long_sleeves else 0.27
    paint(
      arm_cols & (yy >= top + 0.15 * fh + swing) & (yy < top + sleeve_end * fh + swing), ident.shirt
    )
    paint(
      arm_cols & (yy >= top + sleeve_end * fh + swing) & (yy < top + 0.54 * fh + swing), ident.skin
    )

  # Bag on a shoulder strap.
  if ident.bag is not None:
    side = ident.bag_side
    lo, hi = (0.52, 0.88) if side > 0 else (-0.88, -0.52)
    paint(rows(0.42, 0.60) & cols(lo, hi), ident.bag)
    strap_x = cx - side * 0.4 * bw + side * (yy - top - 0.14 * fh) * (0.9 * bw) / (0.3 * fh)
    paint(rows(0.14, 0.44) & (np.abs(xx - strap_x) < 0.8), ident.bag)

  # Head, hair, hat.
  head_cy, head_r = top + 0.075 * fh, 0.068 * fh
  head = ((yy - head_cy) / head_r) ** 2 + ((xx - cx) / (0.8 * head_r)) ** 2 <= 1.0
  paint(head, ident.skin)
  hair_limit = head_cy + (0.6 if back else -0.2) * head_r
  paint(head & (yy < hair_limit), ident.hair)
  if ident.long_hair:
    paint(
      rows(0.07, 0.2) & cols(-0.3, 0.3) & ~head
      if back
      else rows(0.07, 0.18) & (cols(-0.3, -0.14) | cols(0.14, 0.3)),
      ident.hair,
    )
  if ident.hat is not None:
    paint(rows(-0.005, 0.05) & (np.abs(xx - cx) < 0.9 * head_r), ident.hat)
    paint(rows(0.04, 0.06) & (np.abs(xx - cx) < 1.3 * head_r), ident.hat)

  # Occluder: another object entering from the bottom or a side.
  if rng.random() < occlude_prob:
    colour = rng.uniform(20, 235, size=3).astype(np.float32)
    if rng.random() < 0.5:
      oh = int(height * rng.uniform(0.15, 0.4))
      canvas[height - oh :] = colour
    else:
      ow = int(width * rng.uniform(0.2, 0.4))
      if rng.random() < 0.5:
        canvas[:, :ow] = colour
      else:
        canvas[:, width - ow :] = colour

  return _camera_response(rng, camera, canvas)


def _camera_response(
  rng: np.random.Generator, camera: _Camera, canvas: np.ndarray, *, blur: bool = True
) -> np.ndarray:
  """The uint8 image ``camera`` records of the float32 scene ``canvas``.

  Colour cast and brightness, illumination ramp, blur (unless ``blur`` is False), sensor
  noise, then (shifted cameras only) the tone curve and the veil.
  """
  image = (canvas * camera.gain + camera.offset) * camera.ramp
  if blur:
    image = _box_blur(image, camera.blur)
  image = image + rng.normal(0.0, camera.noise, size=image.shape).astype(np.float32)
  if camera.gamma != 1.0 or camera.haze:
    assert camera.haze_colour is not None  # _shift_camera sets it with gamma and haze
    image = 255.0 * (np.clip(image, 0.0, 255.0) / 255.0) ** np.float32(camera.gamma)
    image = image * np.float32(1.0 - camera.haze) + camera.haze_colour * np.float32(camera.haze)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _render_junk(rng: np.random.Generator, camera: _Camera, height: int, width: int) -> np.ndarray:
  """A background-only crop (Market's "junk" detections)."""
  dy = rng.integers(0, 2 * _BG_MARGIN + 1)
  dx = rng.integers(0, camera.background.shape[1] - width + 1)
  canvas = camera.background[dy : dy + height, dx : dx + width]
  return _camera_response(rng, camera, canvas, blur=False)


def _market_name(identity: int, camera: int, frame: int, idx: int) -> str:
  identity_text = "-1" if identity == -1 else f"{identity:04d}"
  return f"{identity_text}_c{camera}s1_{frame:06d}_{idx:02d}.jpg"


def _save_jpeg(array: np.ndarray, path: str) -> None:
  with open(path, "wb") as f:
    f.write(_jpeg_bytes(array))


# Marker keys of datasets written before the rename, read as today's so they still match.
_OLD_MARKER_KEYS = {
  "num_train_ids": "num_train_identities",
  "num_test_ids": "num_test_identities",
  "num_cams": "num_cameras",
  "images_per_cam": "images_per_camera",
}


def _read_marker(folder: str) -> dict | None:
  try:
    with open(os.path.join(folder, _MARKER), encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(marker, dict):
    return marker
  return {_OLD_MARKER_KEYS.get(key, key): value for key, value in marker.items()}


def generate_market_dataset(
  root: str,
  *,
  num_train_identities: int = 100,
  num_test_identities: int = 50,
  num_cameras: int = 6,
  images_per_camera: tuple[int, int] = (2, 5),
  height: int = 128,
  width: int = 64,
  seed: int = 0,
  workers: int = 1,
  camera_shift: float = 0.0,
) -> str:
  """Render a synthetic Market-1501-style dataset under ``root``.

  Writes ``root/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}`` with
  Market file names ``{identity:04d}_c{camera}s1_{frame:06d}_{idx:02d}.jpg`` (camera 1-based)
  and a ``.synthetic.json`` marker holding the parameters. Train identities are
  ``1..num_train_identities``, test identities ``num_train_identities+1 ..
  num_train_identities+num_test_identities``. Every identity appears in a random subset of at
  least two cameras, with ``images_per_camera`` (inclusive range) images in each. For each test
  identity, one image from each of one or two of its cameras goes to ``query`` and the rest to
  ``bounding_box_test``, which also receives ``max(1, num_test_identities // 5)`` distractors
  (identity ``0000``) and ``max(1, num_test_identities // 10)`` junk images (identity ``-1``).

  ``camera_shift`` in [0, 2] gives each camera a strong, consistent appearance of its own on
  top of the mild default nuisance: a colour cast (hues spread evenly over the colour circle,
  so no two cameras share a tint), an exposure gain and a gamma curve, a tinted veil that
  lowers the contrast, the camera's scene blended towards a colour of its own, and extra
  blur (cameras 1, 3, 5) or extra sensor noise (cameras 2, 4, 6). Every image of a camera
  gets the same shift, whatever the identity or split. The shift's directions are drawn from
  ``seed`` alone and their magnitudes scale with ``camera_shift``: at 1.0 the camera
  dominates the appearance (simple image features and random-init network features group
  by camera before identity), while clothing and patterns still identify a person. With 0
  (the default) the files are byte-identical to those written without the option, and the
  marker does not mention it.

  The output is a deterministic function of the arguments (same seed => byte-identical files);
  ``workers`` (processes that render identities in parallel) does not change it. With
  ``workers > 1`` the processes are spawned, so a script that calls this must do so under
  ``if __name__ == "__main__":``.
  The dataset is built in a temporary folder and renamed into place, so a folder with a
  matching marker is always complete; calling again with the same arguments returns at once.

  Returns:
    The dataset folder ``root/Market-1501-v15.09.15``.

  Raises:
    FileExistsError: the dataset folder exists but was not written by this function.
    ValueError: invalid arguments.
  """
  if num_cameras < 2 or num_cameras > 6:
    raise ValueError(f"num_cameras must be in 2..6 (Market cameras), got {num_cameras}")
  lo, hi = images_per_camera
  if lo < 2 or hi < lo:
    raise ValueError(
      f"images_per_camera must be (lo, hi) with 2 <= lo <= hi, got {images_per_camera}"
    )
  if (
    num_train_identities < 1
    or num_test_identities < 1
    or num_train_identities + num_test_identities > 9999
  ):
    raise ValueError(
      "need 1 <= num_train_identities, num_test_identities and a total of at most 9999 identities"
    )
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  if not 0.0 <= camera_shift <= _MAX_CAMERA_SHIFT:  # also refuses NaN
    raise ValueError(
      f"camera_shift must be in [0, {_MAX_CAMERA_SHIFT:g}] (0: no extra camera "
      f"shift, 1: the camera dominates the appearance), got {camera_shift}"
    )

  params = {
    "version": _GENERATOR_VERSION,
    "num_train_identities": num_train_identities,
    "num_test_identities": num_test_identities,
    "num_cameras": num_cameras,
    "images_per_camera": [lo, hi],
    "height": height,
    "width": width,
    "seed": seed,
  }
  if camera_shift > 0:  # absent at 0, so unshifted datasets keep their marker
    params["camera_shift"] = float(camera_shift)
  root = os.path.abspath(root)
  final = os.path.join(root, dataset_folder_name("market1501"))
  if os.path.isdir(final):
    marker = _read_marker(final)
    if marker == params:
      return final
    if marker is None:
      raise FileExistsError(
        f"{final!r} exists but has no {_MARKER} marker: refusing to overwrite what may "
        "be a real dataset. Choose another root."
      )

  os.makedirs(root, exist_ok=True)
  tmp = os.path.join(root, f".{os.path.basename(final)}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
  try:
    _write_market_dataset(tmp, params, workers)
    if os.path.isdir(final):  # an older synthetic dataset with other parameters
      shutil.rmtree(final)
    try:
      os.rename(tmp, final)
    except OSError:
      if _read_marker(final) == params:  # another process finished the same dataset
        return final
      raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return final


def _cameras(params: dict) -> list[_Camera]:
  camera_rng = np.random.default_rng([params["seed"], 0])
  num_cameras = params["num_cameras"]
  cameras = [
    _sample_camera(camera_rng, params["height"], params["width"]) for _ in range(num_cameras)
  ]
  strength = params.get("camera_shift", 0.0)
  if strength > 0:  # its own stream: the draws above are those of an unshifted dataset
    shift_rng = np.random.default_rng([params["seed"], 3])
    phase = float(shift_rng.uniform(0.0, 2.0 * np.pi))
    cameras = [
      _shift_camera(shift_rng, camera, k, num_cameras, phase, strength)
      for k, camera in enumerate(cameras)
    ]
  return cameras


def _jpeg_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def _frame_step(rng: np.random.Generator) -> int:
  """Frames between two consecutive images of the dataset (names carry the running count)."""
  return int(rng.integers(1, 40))


# Set in each worker process by ``_init_worker`` (the cameras are rebuilt there, not pickled).
_WORKER_STATE: dict = {}


def _init_worker(params: dict) -> None:
  _WORKER_STATE.update(params=params, cameras=_cameras(params))


def _render_identity(identity: int) -> list[tuple[int, int, int, int, bytes]]:
  """Every image of ``identity``: ``(split, camera, frame step, idx, JPEG bytes)`` in order.

  Uses only the identity's own generator, so identities render independently (in any
  process); the caller turns the frame steps into the running frame numbers of the names.
  """
  params, cameras = _WORKER_STATE["params"], _WORKER_STATE["cameras"]
  height, width, num_cameras = params["height"], params["width"], params["num_cameras"]
  lo, hi = params["images_per_camera"]
  rng = np.random.default_rng([params["seed"], 1, identity])
  person = _sample_identity(rng)
  n_cameras = int(rng.integers(2, num_cameras + 1))
  own_cameras = np.sort(rng.choice(num_cameras, size=n_cameras, replace=False))
  is_test = identity > params["num_train_identities"]
  query_cameras = set()
  if is_test:
    n_query = min(int(rng.integers(1, 3)), n_cameras)
    query_cameras = set(rng.choice(own_cameras, size=n_query, replace=False).tolist())
  images = []
  for camera in own_cameras.tolist():
    for idx in range(1, int(rng.integers(lo, hi + 1)) + 1):
      image = _render_person(rng, person, cameras[camera], height, width)
      frame_step = _frame_step(rng)
      split = 0 if not is_test else (1 if idx == 1 and camera in query_cameras else 2)
      images.append((split, camera, frame_step, idx, _jpeg_bytes(image)))
  return images


def _write_market_dataset(folder: str, params: dict, workers: int = 1) -> None:
  """Render every image of the dataset described by ``params`` into ``folder``.

  With ``workers > 1`` the identities are rendered by that many processes; the files are
  byte-identical to a one-process run.
  """
  seed, height, width = params["seed"], params["height"], params["width"]
  num_cameras = params["num_cameras"]
  num_train, num_test = params["num_train_identities"], params["num_test_identities"]
  split_paths = [os.path.join(folder, d) for d in _SPLIT_DIRS]
  for path in split_paths:
    os.makedirs(path)
  gallery_dir = split_paths[2]
  _init_worker(params)
  cameras = _WORKER_STATE["cameras"]
  frame = 0

  def next_frame(rng: np.random.Generator) -> int:
    nonlocal frame
    frame += _frame_step(rng)
    return frame

  identities = range(1, num_train + num_test + 1)
  with contextlib.ExitStack() as stack:
    if workers > 1:
      # "spawn": the caller may hold JAX's threads, which a fork would copy half-way.
      pool = stack.enter_context(
        concurrent.futures.ProcessPoolExecutor(
          workers,
          mp_context=multiprocessing.get_context("spawn"),
          initializer=_init_worker,
          initargs=(params,),
        )
      )
      rendered = pool.map(_render_identity, identities, chunksize=8)
    else:
      rendered = map(_render_identity, identities)
    for identity, images in zip(identities, rendered):
      for split, camera, frame_step, idx, data in images:
        frame += frame_step
        with open(
          os.path.join(split_paths[split], _market_name(identity, camera + 1, frame, idx)), "wb"
        ) as f:
          f.write(data)
  _WORKER_STATE.clear()

  extra_rng = np.random.default_rng([seed, 2])
  for idx in range(max(1, num_test // 5)):  # distractors: strangers, often cut by the frame
    camera = int(extra_rng.integers(num_cameras))
    stranger = _sample_identity(extra_rng)
    image = _render_person(
      extra_rng, stranger, cameras[camera], height, width, partial=bool(extra_rng.random() < 0.7)
    )
    name = _market_name(0, camera + 1, next_frame(extra_rng), idx % 100)
    _save_jpeg(image, os.path.join(gallery_dir, name))
  for idx in range(max(1, num_test // 10)):  # junk: background only
    camera = int(extra_rng.integers(num_cameras))
    image = _render_junk(extra_rng, cameras[camera], height, width)
    name = _market_name(-1, camera + 1, next_frame(extra_rng), idx % 100)
    _save_jpeg(image, os.path.join(gallery_dir, name))

  with open(os.path.join(folder, _MARKER), "w", encoding="utf-8") as marker:
    json.dump(params, marker, indent=1, sort_keys=True)


# --------------------------------------------------------------------------------------------
# Tiny trees in every dataset layout, for tests.
# --------------------------------------------------------------------------------------------

FAKE_TREE_CAMERAS: dict[str, tuple[int, ...]] = {
  "market1501": (1, 2, 3, 4, 5, 6),
  "dukemtmcreid": (1, 2, 3, 6, 7, 8),
  "msmt17": (1, 2, 5, 9, 14, 15),
  "veri776": (1, 2, 5, 10, 19, 20),
  "personx": (3, 4, 8, 10, 11, 12),
}
"""Raw (1-based / PersonX) camera numbers used by ``make_fake_tree``, six per dataset."""

_FAKE_TRAIN_IDENTITIES = (1, 2, 3)
_FAKE_TEST_IDENTITIES = (4, 5)


def fake_tree_sizes(name: str) -> dict[str, int]:
  """Number of *parsed* images per split of ``make_fake_tree(root, name)``."""
  sizes = {"train": 12, "query": 2, "gallery": 4}
  if name == "market1501":
    sizes["gallery"] = 6  # plus two distractors
  return sizes


def _fake_file_name(name: str, identity: int, camera: int, n: int) -> str:
  """A file name in ``name``'s format; ``n`` makes it unique."""
  if name == "market1501":
    return _market_name(identity, camera, 100 * n + 7, n % 100)
  if name == "dukemtmcreid":
    return f"{identity:04d}_c{camera}_f{1000 * n + 3:07d}.jpg"
  if name == "msmt17":
    return f"{identity:04d}_c{camera}_{n:04d}.jpg"
  if name == "veri776":
    return f"{identity:04d}_c{camera:03d}_{1000 * n + 50:08d}_0.jpg"
  if name == "personx":
    return f"{identity:04d}_c{camera}_{n:04d}.jpg"
  raise DatasetError(f"Unknown dataset name {name!r}; expected one of: {', '.join(DATASET_NAMES)}.")


def _msmt_official_name(identity: int, camera: int, n: int) -> str:
  return f"{identity:04d}_{n:03d}_{camera:02d}_0303morning_{n:04d}_0.jpg"


def make_fake_tree(
  root: str,
  name: str,
  *,
  seed: int = 0,
  msmt_official: bool = False,
  height: int = 16,
  width: int = 8,
) -> str:
  """Write a tiny dataset in the real folder layout and file-name format of ``name``.

  Uses the six raw cameras ``C = FAKE_TREE_CAMERAS[name]`` and writes (images are
  ``height x width`` JPEGs of random flat colours with noise, deterministic from ``seed``):

  * train: identities 1, 2, 3; identity ``1+k`` has 2 images in camera ``C[2k]`` and 2 in
    ``C[2k+1]`` -> 12 images, 3 identities, all 6 cameras.
  * query: identity 4 once in ``C[0]``, identity 5 once in ``C[1]`` -> 2 images.
  * gallery: identity 4 twice in ``C[2]``, identity 5 twice in ``C[3]`` -> 4 images.
  * market1501 only, extra files: train gets one junk (``-1``) and one distractor (``0000``)
    image, query one junk image, gallery one junk and two distractor images (cameras ``C[4]``,
    ``C[5]``). After parsing: train 12, query 2, gallery 6 (see ``fake_tree_sizes``).
  * every image folder also holds a ``notes.txt`` that parsers must ignore.
  * ``msmt_official=True`` (msmt17 only): the official layout instead, ``train/`` and
    ``test/`` with one sub-folder per identity, file names like
    ``0001_000_01_0303morning_0000_0.jpg`` (camera = third field) and ``list_train.txt``
    (identities 1, 2), ``list_val.txt`` (identity 3), ``list_query.txt``, ``list_gallery.txt``
    with lines
    ``0001/0001_....jpg 1``; same parsed counts.

  Returns:
    The dataset folder (``root/<dataset folder name>``).
  """
  name = name.lower()
  if msmt_official and name != "msmt17":
    raise ValueError("msmt_official=True is only valid for msmt17")
  folder = os.path.join(os.path.abspath(root), dataset_folder_name(name))
  cameras = FAKE_TREE_CAMERAS[name]
  rng = np.random.default_rng(seed)

  # (split, identity, raw camera) for every image, in a fixed order.
  items: list[tuple[str, int, int]] = []
  for k, identity in enumerate(_FAKE_TRAIN_IDENTITIES):
    items += [("train", identity, cameras[2 * k])] * 2 + [
      ("train", identity, cameras[2 * k + 1])
    ] * 2
  items += [("query", 4, cameras[0]), ("query", 5, cameras[1])]
  items += [("gallery", 4, cameras[2])] * 2 + [("gallery", 5, cameras[3])] * 2
  if name == "market1501":
    items += [
      ("train", -1, cameras[0]),
      ("train", 0, cameras[1]),
      ("query", -1, cameras[2]),
      ("gallery", -1, cameras[3]),
      ("gallery", 0, cameras[4]),
      ("gallery", 0, cameras[5]),
    ]

  def write_image(path: str) -> None:
    colour = rng.integers(0, 256, size=3)
    noise = rng.integers(-20, 21, size=(height, width, 3))
    _save_jpeg(np.clip(colour + noise, 0, 255).astype(np.uint8), path)

  if msmt_official:
    list_lines: dict[str, list[str]] = {
      "list_train.txt": [],
      "list_val.txt": [],
      "list_query.txt": [],
      "list_gallery.txt": [],
    }
    for n, (split, identity, camera) in enumerate(items):
      image_dir = "train" if split == "train" else "test"
      rel = f"{identity:04d}/{_msmt_official_name(identity, camera, n)}"
      os.makedirs(os.path.join(folder, image_dir, f"{identity:04d}"), exist_ok=True)
      write_image(os.path.join(folder, image_dir, rel))
      list_name = {
        "train": "list_val.txt" if identity == 3 else "list_train.txt",
        "query": "list_query.txt",
        "gallery": "list_gallery.txt",
      }[split]
      list_lines[list_name].append(f"{rel} {identity}")
    for list_name, lines in list_lines.items():
      with open(os.path.join(folder, list_name), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    for image_dir in ("train", "test"):
      with open(os.path.join(folder, image_dir, "notes.txt"), "w") as f:
        f.write("not an image\n")
    return folder

  split_dirs = dict(
    zip(
      ("train", "query", "gallery"),
      ("image_train", "image_query", "image_test") if name == "veri776" else _SPLIT_DIRS,
    )
  )
  for directory in split_dirs.values():
    os.makedirs(os.path.join(folder, directory), exist_ok=True)
    with open(os.path.join(folder, directory, "notes.txt"), "w") as f:
      f.write("not an image\n")
  for n, (split, identity, camera) in enumerate(items):
    write_image(os.path.join(folder, split_dirs[split], _fake_file_name(name, identity, camera, n)))
  return folder


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m ccreid_jax.data.synthetic --root demo_data``: writes the demo dataset.

  The defaults write the demo's 100 + 50 identities at 128x64. A Market-1501-sized set
  (751 train identities; ~13,000 train images with ``--images-per-camera 2 6``) is
  ``--num-train-identities 751 --num-test-identities 750 --images-per-camera 2 6 --workers 16``.
  A set whose cameras dominate the appearance adds ``--camera-shift 1``.
  """
  import argparse

  parser = argparse.ArgumentParser(description=(main.__doc__ or "").split("\n")[0])
  parser.add_argument("--root", required=True, help="folder that will hold Market-1501-v15.09.15/")
  parser.add_argument("--num-train-identities", type=int, default=100)
  parser.add_argument("--num-test-identities", type=int, default=50)
  parser.add_argument("--num-cameras", type=int, default=6, help="cameras, 2..6")
  parser.add_argument(
    "--images-per-camera",
    type=int,
    nargs=2,
    default=(2, 5),
    metavar=("LO", "HI"),
    help="images of an identity per camera, drawn from LO..HI",
  )
  parser.add_argument(
    "--camera-shift",
    type=float,
    default=0.0,
    help="strength of each camera's own appearance, 0..2 (0: none, the "
    "default; 1: the camera dominates the appearance)",
  )
  parser.add_argument("--height", type=int, default=128)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--workers",
    type=int,
    default=1,
    help="processes rendering identities (the files do not depend on it)",
  )
  args = parser.parse_args(argv)
  folder = generate_market_dataset(
    args.root,
    num_train_identities=args.num_train_identities,
    num_test_identities=args.num_test_identities,
    num_cameras=args.num_cameras,
    images_per_camera=tuple(args.images_per_camera),
    height=args.height,
    width=args.width,
    seed=args.seed,
    workers=args.workers,
    camera_shift=args.camera_shift,
  )
  print(f"dataset ready: {folder}")


if __name__ == "__main__":
  main()
