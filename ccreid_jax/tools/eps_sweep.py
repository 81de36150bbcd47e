"""Choose DBSCAN's radius without retraining: one model's train features clustered at many eps.

  python -m ccreid_jax.main --mode sweep --config custom --workdir runs/mine \\
      [--checkpoint best|latest|<N>|<checkpoint folder>|init] --eps 0.3:0.8:0.05 [--out DIR]

(``commands.sweep`` runs it; this module holds its pieces.)

The sweep loads the model of a checkpoint (``init``: the initial model, ImageNet weights from
``model.pretrained``, or a random one when asked for with ``model.pretrained=none``; neither is
refused, as training is), extracts the train features once (evaluation transform, as every
epoch's clustering does), computes the configured sparse distance once (``cluster.distance``:
"jaccard" or "ca_jaccard", stored up to the largest eps of the sweep) and runs DBSCAN
(``cluster.min_samples``) at every eps. At each eps the labels are the ones the training's
clustering gives the same features with ``cluster.eps`` set to it
(docs/algorithms.md section 5). It prints a table and writes ``eps_sweep_<checkpoint>.json``
and ``eps_sweep_<checkpoint>.png`` (``init`` or the checkpoint number) into ``--out`` (default:
the workdir).

``--eps`` is ``start:stop:step`` (stop included), a comma-separated list, or one value; every
eps lies in (0, 1), the range of the Jaccard distance.

Per eps:

* ``clusters``: DBSCAN's clusters, the pseudo identities an epoch would train on;
* ``outliers`` and ``outlier_fraction``: images in no cluster (left out of that epoch);
* ``largest_share``: the largest cluster's size over the N train images;
* ``ari`` (only when the train identities are known, i.e. a benchmark): the adjusted Rand index
  of the labels against them (outliers count as one group, as the training log's
  ``cluster_ari``).

How to read it. A small eps links few images: many small clusters and most images outliers.
As eps grows the outliers join clusters, and then clusters start to merge: the cluster count
falls and the largest cluster's share climbs. A good eps lies on the plateau of the cluster
count, where it changes little while the outlier fraction keeps falling, before the largest
share starts to rise. A giant cluster (a share far above one identity's share of the images)
warns that distinct identities are merged into one pseudo label, which the contrastive loss
then pulls together; a smaller eps is safer than a larger one. The published recipes keep eps
fixed for the whole run (0.6 for ImageNet-initialised ResNet-50 on the person benchmarks):
sweep the initial model (what the first epoch clusters) and, once a run has a few epochs, a
middle checkpoint, and prefer an eps that sits on the plateau for both. Where identities are
known, the ARI's peak is the best eps for these features; comparing it with the plateau on a
benchmark shows how far the rule of thumb can be trusted.

Not swept: the reliability criterion (``cluster.reliable``; the sweep is plain DBSCAN at each
eps) and ``rlcc.outliers_as_singletons`` (the outliers are counted as DBSCAN leaves them).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from sklearn.metrics import adjusted_rand_score

from ccreid_jax import clustering
from ccreid_jax.evaluation import visualize

__all__ = ["MAX_EPS_VALUES", "format_table", "label_row", "parse_eps", "sweep_image", "sweep_rows"]

MAX_EPS_VALUES = 1000


def parse_eps(text: str) -> list[float]:
  """The radii of ``--eps``: ``start:stop:step`` (stop included), ``a,b,c`` or ``a``.

  Returns:
    Sorted distinct values, each rounded to 10 decimals (0.3 + 2 * 0.05 is 0.4).

  Raises:
    ValueError: not numbers, a value outside (0, 1), a step <= 0, stop < start, or more than
      ``MAX_EPS_VALUES`` values.
  """
  text = str(text).strip()
  try:
    if ":" in text:
      parts = [float(p) for p in text.split(":")]
      if len(parts) != 3:
        raise ValueError
      start, stop, step = parts
      if not step > 0 or stop < start:
        raise ValueError(f"--eps {text}: start:stop:step needs step > 0 and stop >= start")
      count = int(math.floor((stop - start) / step + 1e-9)) + 1
      if count > MAX_EPS_VALUES:
        raise ValueError(f"--eps {text}: {count} values, at most {MAX_EPS_VALUES}")
      values = [start + i * step for i in range(count)]
    else:
      values = [float(p) for p in text.split(",")]
  except ValueError as exc:
    if str(exc).startswith("--eps"):
      raise
    raise ValueError(
      f"--eps {text}: expected start:stop:step (e.g. 0.3:0.8:0.05), a "
      "comma-separated list (0.5,0.6) or one number"
    ) from None
  values = sorted({round(v, 10) for v in values})
  outside = [v for v in values if not 0 < v < 1]
  if outside:
    raise ValueError(
      f"--eps {text}: {outside[0]} is outside (0, 1); Jaccard distances lie in "
      "[0, 1] and absent pairs are 1.0, so eps >= 1 links every pair"
    )
  return values


def label_row(labels: np.ndarray, eps: float, true_identities: np.ndarray | None = None) -> dict:
  """The figures of one clustering (see the module docstring); ``ari`` only with identities."""
  n = int(labels.size)
  clustered = labels[labels >= 0]
  sizes = np.bincount(clustered) if clustered.size else np.zeros(0, np.int64)
  outliers = int(n - clustered.size)
  row = {
    "eps": float(eps),
    "clusters": int(np.count_nonzero(sizes)),
    "outliers": outliers,
    "outlier_fraction": outliers / n if n else float("nan"),
    "largest_cluster": int(sizes.max()) if sizes.size else 0,
  }
  row["largest_share"] = row["largest_cluster"] / n if n else float("nan")
  if true_identities is not None:
    row["ari"] = float(adjusted_rand_score(true_identities, labels))
  return row


def sweep_rows(
  distance, eps_values: list[float], min_samples: int, true_identities: np.ndarray | None = None
) -> list[dict]:
  """DBSCAN on one precomputed ``distance`` at every eps: one ``label_row`` each.

  ``distance`` must hold every pair up to ``max(eps_values)`` (``pseudo_labels.cluster_distance``
  with that ``max_distance``); DBSCAN at a smaller eps reads the same stored values.
  """
  return [
    label_row(
      clustering.dbscan_labels(distance, eps=eps, min_samples=min_samples), eps, true_identities
    )
    for eps in eps_values
  ]


def format_table(rows: list[dict], configured_eps: float | None = None) -> str:
  """The sweep as a text table; the configured eps is marked with ``<``."""
  with_ari = any("ari" in r for r in rows)
  header = "   eps | clusters | outliers | outlier % | largest % " + ("|   ARI" if with_ari else "")
  lines = [header, "-" * len(header)]
  for r in rows:
    line = (
      f"{r['eps']:6.3f} | {r['clusters']:8d} | {r['outliers']:8d} | "
      f"{100 * r['outlier_fraction']:9.1f} | {100 * r['largest_share']:9.1f} "
    )
    if with_ari:
      line += f"| {r['ari']:5.3f}"
    if configured_eps is not None and math.isclose(r["eps"], configured_eps, abs_tol=1e-9):
      line += "  < config.cluster.eps"
    lines.append(line)
  return "\n".join(lines)


def _integer_axis(values: list[float]) -> tuple[int, str]:
  """The power of ten that makes every eps an integer (the plot's x axis counts integers)."""
  for digits in range(2, 7):
    scale = 10**digits
    if all(abs(v * scale - round(v * scale)) < 1e-6 for v in values):
      return scale, f"eps x {scale}"
  return 10**6, "eps x 1000000"


def sweep_image(rows: list[dict], *, title: str = "") -> Image.Image:
  """Four panels (``visualize.CURVES_SIZE``) against eps: clusters, outlier fraction, the
  largest cluster's share, and the ARI (a "no data" panel without known identities)."""
  scale, x_label = _integer_axis([r["eps"] for r in rows])
  xs = [int(round(r["eps"] * scale)) for r in rows]

  def series(key: str) -> list[tuple[int, float]]:
    return [(x, float(r[key])) for x, r in zip(xs, rows) if key in r]

  width, height = visualize.CURVES_SIZE
  canvas = Image.new("RGB", visualize.CURVES_SIZE, visualize.BACKGROUND)
  top = 16 if title else 0
  half_w, half_h = width // 2, (height - top) // 2
  boxes = [
    (0, top, half_w, top + half_h),
    (half_w, top, width, top + half_h),
    (0, top + half_h, half_w, height),
    (half_w, top + half_h, width, height),
  ]
  panels = [
    ("clusters", [("clusters", series("clusters"))]),
    ("outlier fraction", [("outliers", series("outlier_fraction"))]),
    ("largest cluster / N", [("largest", series("largest_share"))]),
    ("adjusted Rand index vs the true identities", [("ARI", series("ari"))]),
  ]
  draw_panel = visualize.draw_panel
  for box, (panel_title, panel_series) in zip(boxes, panels):
    draw_panel(canvas, box, panel_title, panel_series, x_range=(min(xs), max(xs)), x_label=x_label)
  if title:
    ImageDraw.Draw(canvas).text((8, 2), title, fill=(0, 0, 0))
  return canvas
