"""Pictures of a run for a researcher: rank lists and training curves (numpy + Pillow only).

* ``rank_list_image`` draws, for a few queries, the query and its first ``topk`` gallery
  matches under the evaluation protocol (gallery entries with the query's identity *and* camera
  removed), each framed green (same identity) or red (other identity), with rank and camera
  printed.
* ``search_rank_list_image`` draws a search without identities or cameras: each query and the
  gallery entries it was ranked against, in the given order, framed grey, with rank and
  distance printed.
* ``training_curves_image`` draws the ``metrics.jsonl`` history of a run: mAP / rank-1 per
  evaluation (the initial features at epoch -1, labelled "init"), the number of clusters, the
  outliers and the mean loss per epoch.

Both return a ``PIL.Image`` whose size depends only on the arguments' shapes (documented at
each function), and draw nothing at random: the same inputs give the same pixels.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from ccreid_jax.utils import write_atomic

__all__ = [
  "BACKGROUND",
  "BORDER",
  "CORRECT",
  "CURVES_SIZE",
  "GAP",
  "LABEL_HEIGHT",
  "MARGIN",
  "NEUTRAL",
  "QUERY",
  "WRONG",
  "choose_queries",
  "draw_panel",
  "rank_list_from_records",
  "rank_list_image",
  "rank_list_size",
  "ranked_gallery",
  "save_png",
  "save_rank_list",
  "save_training_curves",
  "search_rank_list_image",
  "training_curves_image",
]

# Rank-list geometry, in pixels. A cell is a thumbnail in a BORDER-wide frame with a
# LABEL_HEIGHT text line below it, surrounded by MARGIN on every side; GAP separates the
# query column from the gallery columns.
BORDER = 4
MARGIN = 3
LABEL_HEIGHT = 14
GAP = 12

BACKGROUND = (255, 255, 255)
QUERY = (40, 90, 220)  # Frame of the query thumbnail.
CORRECT = (0, 170, 0)  # Frame of a gallery match with the query's identity.
WRONG = (220, 0, 0)  # Frame of a gallery match with another identity.
NEUTRAL = (150, 150, 150)  # Frame of a gallery match whose identity is not known (a search).
_MISSING_IMAGE = (160, 160, 160)  # Thumbnail of a file that cannot be read.
_TEXT = (0, 0, 0)

CURVES_SIZE = (900, 600)  # (width, height) of training_curves_image.


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  return ImageFont.load_default()


# ---------------------------------------------------------------------------------------
# Rank lists.
# ---------------------------------------------------------------------------------------


def choose_queries(num_queries: int, n: int, seed: int) -> np.ndarray:
  """``min(n, num_queries)`` distinct query indices in increasing order, drawn with ``seed``."""
  if num_queries < 0 or n < 0:
    raise ValueError(f"num_queries and n must be >= 0, got {num_queries} and {n}.")
  rng = np.random.default_rng(seed)
  chosen = rng.choice(num_queries, size=min(n, num_queries), replace=False)
  return np.sort(chosen).astype(np.int64)


def ranked_gallery(
  distances: np.ndarray,
  query_identity: int,
  query_camera: int,
  gallery_identities: np.ndarray,
  gallery_cameras: np.ndarray,
  topk: int,
) -> np.ndarray:
  """Gallery indices of one query's first ``topk`` matches under the evaluation protocol.

  Sorted by increasing distance (a stable sort: ties keep gallery order, as in
  ``evaluate_ranking``), after removing the entries with the query's identity and camera.
  """
  order = np.argsort(np.asarray(distances), kind="stable")
  gallery_identities = np.asarray(gallery_identities)
  gallery_cameras = np.asarray(gallery_cameras)
  same = (gallery_identities[order] == query_identity) & (gallery_cameras[order] == query_camera)
  return order[~same][:topk]


def rank_list_size(num_rows: int, topk: int, thumb: tuple[int, int] = (128, 64)) -> tuple[int, int]:
  """``(width, height)`` of a rank list with ``num_rows`` queries, ``topk`` matches each.

  ``width = (topk + 1) * (thumb_w + 2 * BORDER + 2 * MARGIN) + GAP`` and
  ``height = num_rows * (thumb_h + 2 * BORDER + LABEL_HEIGHT + 2 * MARGIN)``.
  """
  thumb_h, thumb_w = thumb
  width = (topk + 1) * (thumb_w + 2 * BORDER + 2 * MARGIN) + GAP
  height = num_rows * (thumb_h + 2 * BORDER + LABEL_HEIGHT + 2 * MARGIN)
  return width, height


def _thumbnail(source: Any, thumb: tuple[int, int]) -> Image.Image:
  """A (thumb_h, thumb_w) RGB thumbnail of a path or an (H, W, 3) uint8 array."""
  thumb_h, thumb_w = thumb
  if isinstance(source, (str, os.PathLike)):
    try:
      with Image.open(source) as opened:
        image = opened.convert("RGB")
    except OSError:
      return Image.new("RGB", (thumb_w, thumb_h), _MISSING_IMAGE)
  else:
    image = Image.fromarray(np.asarray(source, dtype=np.uint8)).convert("RGB")
  return image.resize((thumb_w, thumb_h), Image.Resampling.BILINEAR)


def _paste_cell(
  canvas: Image.Image,
  x: int,
  y: int,
  source: Any,
  frame: tuple[int, int, int],
  label: str,
  thumb: tuple[int, int],
) -> None:
  """One framed thumbnail at the cell whose top-left corner (inside MARGIN) is (x, y)."""
  thumb_h, thumb_w = thumb
  draw = ImageDraw.Draw(canvas)
  draw.rectangle([x, y, x + thumb_w + 2 * BORDER - 1, y + thumb_h + 2 * BORDER - 1], fill=frame)
  canvas.paste(_thumbnail(source, thumb), (x + BORDER, y + BORDER))
  # The label is drawn on its own strip, so a long one is clipped to the cell's width.
  strip = Image.new("RGB", (thumb_w + 2 * BORDER, LABEL_HEIGHT), BACKGROUND)
  ImageDraw.Draw(strip).text((1, 1), label, fill=_TEXT, font=_font())
  canvas.paste(strip, (x, y + thumb_h + 2 * BORDER))


def rank_list_image(
  query_paths: Sequence[Any] | np.ndarray,
  query_identities: npt.ArrayLike,
  query_cameras: npt.ArrayLike,
  gallery_paths: Sequence[Any] | np.ndarray,
  gallery_identities: npt.ArrayLike,
  gallery_cameras: npt.ArrayLike,
  distmat: np.ndarray,
  *,
  query_indices: Sequence[int] | np.ndarray,
  topk: int = 10,
  thumb: tuple[int, int] = (128, 64),
) -> Image.Image:
  """One row per query of ``query_indices``: the query, then its first ``topk`` matches.

  Args:
    query_paths, gallery_paths: image files, or decoded (H, W, 3) uint8 images (an (N, H,
      W, 3) array works). Files that cannot be read are drawn grey.
    query_identities, query_cameras, gallery_identities, gallery_cameras: identities and cameras.
    distmat: (num_query, num_gallery) distances, smaller is closer.
    query_indices: rows of ``distmat`` to draw, top to bottom.
    topk: matches per row. A query with fewer kept gallery entries leaves the rest blank.
    thumb: (height, width) of every thumbnail.

  The query is framed blue and labelled ``q<identity> c<camera>``; match ``r`` is framed green
  (``CORRECT``) when its identity is the query's and red (``WRONG``) otherwise, and labelled
  ``<r> c<camera>`` (cameras as the dataset records hold them, 0-based). Gallery entries with
  the query's identity and camera are skipped, as the evaluation does. The size is
  ``rank_list_size(len(query_indices), topk, thumb)``: column ``j`` (0 = query) starts at
  ``x = j * cell + MARGIN + (GAP if j > 0 else 0)`` and row ``i`` at ``y = i * row + MARGIN``
  with ``cell = thumb_w + 2 * BORDER + 2 * MARGIN`` and
  ``row = thumb_h + 2 * BORDER + LABEL_HEIGHT + 2 * MARGIN``.
  """
  distmat = np.asarray(distmat)
  query_identities, query_cameras = np.asarray(query_identities), np.asarray(query_cameras)
  gallery_identities, gallery_cameras = np.asarray(gallery_identities), np.asarray(gallery_cameras)
  num_query, num_gallery = len(query_identities), len(gallery_identities)
  if distmat.shape != (num_query, num_gallery):
    raise ValueError(
      f"distmat has shape {distmat.shape}; expected ({num_query}, {num_gallery}) "
      "(queries x gallery)."
    )
  if len(query_paths) != num_query or len(gallery_paths) != num_gallery:
    raise ValueError(
      f"got {len(query_paths)} query / {len(gallery_paths)} gallery images for "
      f"{num_query} / {num_gallery} identities."
    )
  if len(query_cameras) != num_query or len(gallery_cameras) != num_gallery:
    raise ValueError(
      "query_cameras / gallery_cameras must have one entry per query / gallery image."
    )
  if topk < 1 or min(thumb) < 1:
    raise ValueError(f"topk and the thumbnail size must be positive, got {topk} and {thumb}.")
  for q in query_indices:
    if not 0 <= int(q) < num_query:
      raise ValueError(f"query index {q} is out of range [0, {num_query}).")

  thumb_h, thumb_w = thumb
  cell = thumb_w + 2 * BORDER + 2 * MARGIN
  row = thumb_h + 2 * BORDER + LABEL_HEIGHT + 2 * MARGIN
  canvas = Image.new("RGB", rank_list_size(len(query_indices), topk, thumb), BACKGROUND)
  for i, q in enumerate(int(q) for q in query_indices):
    y = i * row + MARGIN
    _paste_cell(
      canvas, MARGIN, y, query_paths[q], QUERY, f"q{query_identities[q]} c{query_cameras[q]}", thumb
    )
    matches = ranked_gallery(
      distmat[q], query_identities[q], query_cameras[q], gallery_identities, gallery_cameras, topk
    )
    for rank, g in enumerate(matches, start=1):
      frame = CORRECT if gallery_identities[g] == query_identities[q] else WRONG
      x = rank * cell + MARGIN + GAP
      _paste_cell(canvas, x, y, gallery_paths[g], frame, f"{rank} c{gallery_cameras[g]}", thumb)
  return canvas


def rank_list_from_records(
  query_records: Sequence[Any],
  gallery_records: Sequence[Any],
  distmat: np.ndarray,
  *,
  query_indices: Sequence[int],
  topk: int = 10,
  thumb: tuple[int, int] = (128, 64),
) -> Image.Image:
  """``rank_list_image`` for dataset records (anything with ``path``, ``identity``, ``camera``)."""
  return rank_list_image(
    [r.path for r in query_records],
    [r.identity for r in query_records],
    [r.camera for r in query_records],
    [r.path for r in gallery_records],
    [r.identity for r in gallery_records],
    [r.camera for r in gallery_records],
    distmat,
    query_indices=query_indices,
    topk=topk,
    thumb=thumb,
  )


def search_rank_list_image(
  query_images: Sequence[Any],
  gallery_images: Sequence[Any],
  indices: np.ndarray,
  distances: np.ndarray,
  *,
  thumb: tuple[int, int] = (128, 64),
) -> Image.Image:
  """One row per query: the query, then the gallery entries it was ranked against.

  For searches where identities and cameras are unknown (nothing is filtered out, nothing is
  marked right or wrong).

  Args:
    query_images, gallery_images: image files or decoded (H, W, 3) uint8 images, as for
      ``rank_list_image``.
    indices: (num_rows, topk) gallery indices, closest first; row ``i`` belongs to query
      ``i``.
    distances: (num_rows, topk) the matching distances, printed under each match.
    thumb: (height, width) of every thumbnail.

  The query is framed blue (``QUERY``) and labelled ``q<i>``; match ``r`` is framed grey
  (``NEUTRAL``) and labelled ``<r> <distance>`` (3 decimals). Size and cell positions are
  those of ``rank_list_image``: ``rank_list_size(num_rows, topk, thumb)``.
  """
  indices = np.asarray(indices)
  distances = np.asarray(distances)
  if indices.ndim != 2 or distances.shape != indices.shape:
    raise ValueError(
      f"indices and distances must be (num_rows, topk) arrays of one shape, "
      f"got {indices.shape} and {distances.shape}."
    )
  num_rows, topk = indices.shape
  if num_rows > len(query_images):
    raise ValueError(f"{num_rows} rows of matches but {len(query_images)} query images.")
  if indices.size and not (indices.min() >= 0 and indices.max() < len(gallery_images)):
    raise ValueError(f"gallery indices must lie in [0, {len(gallery_images)}).")
  if topk < 1 or min(thumb) < 1:
    raise ValueError(f"topk and the thumbnail size must be positive, got {topk} and {thumb}.")

  thumb_h, thumb_w = thumb
  cell = thumb_w + 2 * BORDER + 2 * MARGIN
  row = thumb_h + 2 * BORDER + LABEL_HEIGHT + 2 * MARGIN
  canvas = Image.new("RGB", rank_list_size(num_rows, topk, thumb), BACKGROUND)
  for i in range(num_rows):
    y = i * row + MARGIN
    _paste_cell(canvas, MARGIN, y, query_images[i], QUERY, f"q{i}", thumb)
    for rank, (g, d) in enumerate(zip(indices[i], distances[i]), start=1):
      x = rank * cell + MARGIN + GAP
      _paste_cell(canvas, x, y, gallery_images[int(g)], NEUTRAL, f"{rank} {float(d):.3f}", thumb)
  return canvas


def save_png(path: str, image: Image.Image) -> None:
  """Writes ``image`` as PNG atomically (a temporary file renamed into place)."""
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  write_atomic(path, buffer.getvalue())


def save_rank_list(path: str, *args: Any, **kwargs: Any) -> Image.Image:
  """Saves ``rank_list_image(*args, **kwargs)`` as a PNG at ``path``; returns the image."""
  image = rank_list_image(*args, **kwargs)
  save_png(path, image)
  return image


# ---------------------------------------------------------------------------------------
# Training curves.
# ---------------------------------------------------------------------------------------

_PANEL_LEFT = 58  # Room for the y tick labels.
_PANEL_RIGHT = 14
_PANEL_TOP = 26  # Room for the title and legend.
_PANEL_BOTTOM = 30  # Room for the x tick labels and the axis name.
_AXIS = (0, 0, 0)
_GRID = (225, 225, 225)
SERIES_COLOURS = {
  "mAP": (31, 119, 180),
  "rank-1": (255, 127, 14),
  "clusters": (44, 160, 44),
  "outliers": (214, 39, 40),
  "loss": (148, 103, 189),
  "largest": (140, 86, 75),
  "ARI": (31, 119, 180),
}


def _history(
  records: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
  """``(initial record or None, one epoch record per epoch)``; the last record written wins.

  A resumed run can log an epoch twice (``run.Run.epoch_records`` keeps the later one;
  so does this).
  """
  initial = None
  by_epoch: dict[int, dict[str, Any]] = {}
  for record in records:
    if record.get("kind") == "initial":
      initial = dict(record)
    elif record.get("kind") == "epoch" and "epoch" in record:
      by_epoch[int(record["epoch"])] = dict(record)
  return initial, [by_epoch[e] for e in sorted(by_epoch)]


def _finite(value: Any) -> TypeGuard[float]:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _nice_step(span: float, max_ticks: int) -> float:
  """The smallest 1, 2 or 5 times a power of ten giving at most ``max_ticks`` intervals."""
  raw = span / max(max_ticks, 1)
  power = 10.0 ** math.floor(math.log10(raw))
  for mult in (1.0, 2.0, 5.0, 10.0):
    if mult * power >= raw:
      return mult * power
  return 10.0 * power


def _y_range(values: list[float]) -> tuple[float, float, float]:
  """``(low, high, step)``: a tick-aligned range holding every value."""
  low, high = min(values), max(values)
  if high - low < 1e-12:
    pad = max(abs(low) * 0.1, 1.0)
    low, high = low - pad, high + pad
  step = _nice_step(high - low, 5)
  return math.floor(low / step) * step, math.ceil(high / step) * step, step


def _format_tick(value: float, step: float) -> str:
  decimals = max(0, -int(math.floor(math.log10(step)))) if step < 1 else 0
  text = f"{value:.{decimals}f}"
  return "0" if text.strip("-0.") == "" else text


def draw_panel(
  canvas: Image.Image,
  box: tuple[int, int, int, int],
  title: str,
  series: list[tuple[str, list[tuple[int, float]]]],
  *,
  x_range: tuple[int, int],
  x_label: str = "epoch",
) -> None:
  """A line plot of ``series`` ((name, [(x, y), ...]), ...) in ``box`` (left, top, right, bottom).

  x values are epochs; -1 is labelled "init". Points with non-finite y are left out.
  """
  draw = ImageDraw.Draw(canvas)
  font = _font()
  left, top, right, bottom = box
  px0, py0 = left + _PANEL_LEFT, top + _PANEL_TOP
  px1, py1 = right - _PANEL_RIGHT, bottom - _PANEL_BOTTOM
  draw.text((left + 8, top + 6), title, fill=_TEXT, font=font)

  points = [(x, y) for _, pts in series for x, y in pts if _finite(y)]
  draw.rectangle([px0, py0, px1, py1], outline=_AXIS)
  if not points:
    draw.text(((px0 + px1) // 2 - 20, (py0 + py1) // 2 - 5), "no data", fill=_TEXT, font=font)
    return

  x_lo, x_hi = x_range
  if x_hi == x_lo:
    x_lo, x_hi = x_lo - 1, x_hi + 1
  y_lo, y_hi, y_step = _y_range([y for _, y in points])

  def to_px(x: float, y: float) -> tuple[int, int]:
    u = px0 + (x - x_lo) / (x_hi - x_lo) * (px1 - px0)
    v = py1 - (y - y_lo) / (y_hi - y_lo) * (py1 - py0)
    return int(round(u)), int(round(v))

  # y ticks with values, and a light grid.
  n_y = int(round((y_hi - y_lo) / y_step))
  for i in range(n_y + 1):
    value = y_lo + i * y_step
    _, v = to_px(x_lo, value)
    if py0 < v < py1:
      draw.line([px0 + 1, v, px1 - 1, v], fill=_GRID)
    draw.line([px0 - 4, v, px0, v], fill=_AXIS)
    text = _format_tick(value, y_step)
    width = draw.textlength(text, font=font)
    draw.text((px0 - 6 - width, v - 6), text, fill=_TEXT, font=font)

  # x ticks: integer epochs, at most about 10 of them.
  x_step = max(1, int(_nice_step(x_hi - x_lo, 10)))
  first = int(math.ceil(x_lo / x_step) * x_step)
  ticks = list(range(first, x_hi + 1, x_step))
  if x_range[0] == -1 and -1 not in ticks:
    ticks = [-1] + [t for t in ticks if t - x_step // 2 > -1]
  for tick in ticks:
    if not x_lo <= tick <= x_hi:
      continue
    u, _ = to_px(tick, y_lo)
    draw.line([u, py1, u, py1 + 4], fill=_AXIS)
    text = "init" if tick == -1 else str(tick)
    width = draw.textlength(text, font=font)
    draw.text((u - width / 2, py1 + 6), text, fill=_TEXT, font=font)
  width = draw.textlength(x_label, font=font)
  draw.text(((px0 + px1) / 2 - width / 2, py1 + 17), x_label, fill=_TEXT, font=font)

  # The series, and a legend at the top right.
  legend_x = right - _PANEL_RIGHT
  for name, pts in reversed(series):
    colour = SERIES_COLOURS[name]
    pixels = [to_px(x, y) for x, y in pts if _finite(y)]
    if len(pixels) > 1:
      draw.line(pixels, fill=colour, width=2)
    for u, v in pixels:
      draw.rectangle([u - 2, v - 2, u + 2, v + 2], fill=colour)
    width = int(draw.textlength(name, font=font))
    legend_x -= width
    draw.text((legend_x, top + 6), name, fill=_TEXT, font=font)
    legend_x -= 20
    draw.line([legend_x, top + 12, legend_x + 15, top + 12], fill=colour, width=3)
    legend_x -= 12


def training_curves_image(
  records: Sequence[Mapping[str, Any]], *, num_train: int | None = None
) -> Image.Image:
  """Four line plots of a run's ``metrics.jsonl`` records, as a ``CURVES_SIZE`` (900x600) image.

  Panels (left to right, top to bottom): mAP and rank-1 in % per evaluation (the ``initial``
  record at x = -1, labelled "init"); clusters per epoch; outliers per epoch, as a fraction of
  ``num_train`` when given (or of a record's ``num_train`` field), else as a count; mean loss
  per epoch. Epochs logged twice (a resumed run) count once, the last record winning;
  non-finite values (the loss of an epoch without clusters) are left out.
  """
  initial, epochs = _history(records)
  evaluations: list[tuple[int, dict[str, Any]]] = []
  if initial is not None and _finite(initial.get("mAP")):
    evaluations.append((-1, initial))
  evaluations += [(int(r["epoch"]), r) for r in epochs if _finite(r.get("mAP"))]

  xs = [x for x, _ in evaluations] + [int(r["epoch"]) for r in epochs]
  x_range = (min(xs), max(xs)) if xs else (0, 1)

  def per_epoch(key: str, scale: float = 1.0) -> list[tuple[int, float]]:
    return [(int(r["epoch"]), float(r[key]) * scale) for r in epochs if _finite(r.get(key))]

  outliers: list[tuple[int, float]] = []
  as_fraction = True
  for r in epochs:
    total = num_train if num_train is not None else r.get("num_train")
    if not _finite(r.get("outliers")):
      continue
    if _finite(total) and total > 0:
      outliers.append((int(r["epoch"]), float(r["outliers"]) / float(total)))
    else:
      as_fraction = False
      outliers.append((int(r["epoch"]), float(r["outliers"])))
  if not as_fraction:  # Do not mix fractions and counts in one plot.
    outliers = per_epoch("outliers")

  width, height = CURVES_SIZE
  canvas = Image.new("RGB", CURVES_SIZE, BACKGROUND)
  half_w, half_h = width // 2, height // 2
  boxes = [
    (0, 0, half_w, half_h),
    (half_w, 0, width, half_h),
    (0, half_h, half_w, height),
    (half_w, half_h, width, height),
  ]
  draw_panel(
    canvas,
    boxes[0],
    "evaluation (%)",
    [
      ("mAP", [(x, 100 * float(r["mAP"])) for x, r in evaluations]),
      ("rank-1", [(x, 100 * float(r["rank1"])) for x, r in evaluations if _finite(r.get("rank1"))]),
    ],
    x_range=x_range,
  )
  draw_panel(canvas, boxes[1], "clusters", [("clusters", per_epoch("clusters"))], x_range=x_range)
  draw_panel(
    canvas,
    boxes[2],
    "outlier fraction" if as_fraction else "outliers",
    [("outliers", outliers)],
    x_range=x_range,
  )
  draw_panel(canvas, boxes[3], "mean loss", [("loss", per_epoch("loss"))], x_range=x_range)
  return canvas


def save_training_curves(
  path: str, records: Sequence[Mapping[str, Any]], *, num_train: int | None = None
) -> Image.Image:
  """Saves ``training_curves_image(records, num_train=...)`` as a PNG; returns the image."""
  image = training_curves_image(records, num_train=num_train)
  save_png(path, image)
  return image
