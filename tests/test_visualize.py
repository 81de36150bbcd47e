"""Rank-list and training-curve pictures: exact sizes, frame colours, the protocol's filtering."""

import numpy as np
import pytest
from PIL import Image

from ccreid_jax.evaluation import visualize as vis

THUMB = (32, 16)  # (height, width)
CELL = THUMB[1] + 2 * vis.BORDER + 2 * vis.MARGIN
ROW = THUMB[0] + 2 * vis.BORDER + vis.LABEL_HEIGHT + 2 * vis.MARGIN


def _solid(colour, shape=(40, 20)):
  return np.full(shape + (3,), colour, np.uint8)


def _cell_origin(row: int, column: int) -> tuple[int, int]:
  """Top-left corner of the frame of a cell (column 0 = query)."""
  x = column * CELL + vis.MARGIN + (vis.GAP if column > 0 else 0)
  return x, row * ROW + vis.MARGIN


def _frame_colour(image, row, column):
  x, y = _cell_origin(row, column)
  return image.getpixel((x + 1, y + 1))


def _thumb_colour(image, row, column):
  x, y = _cell_origin(row, column)
  return image.getpixel((x + vis.BORDER + THUMB[1] // 2, y + vis.BORDER + THUMB[0] // 2))


# A hand-made problem: two queries, five gallery images each of one solid colour.
GALLERY_COLOURS = [(10, 0, 0), (20, 0, 0), (30, 0, 0), (40, 0, 0), (50, 0, 0)]
QUERY_IDENTITIES, QUERY_CAMERAS = [1, 3], [0, 2]
GALLERY_IDENTITIES = [1, 2, 1, 3, 3]
GALLERY_CAMERAS = [0, 1, 1, 2, 0]
DISTMAT = np.array(
  [
    # q0 (identity 1, camera 0): g0 is closest but has the query's identity and camera: it must
    # be skipped.
    [0.0, 0.1, 0.2, 0.3, 0.4],
    # q1 (identity 3, camera 2): g3 (same identity and camera) skipped; g4 (same identity, other
    # camera) is rank 1.
    [0.5, 0.4, 0.3, 0.0, 0.1],
  ],
  np.float32,
)


def _problem_image(topk=3, query_indices=(0, 1), gallery=None):
  gallery = [_solid(c) for c in GALLERY_COLOURS] if gallery is None else gallery
  return vis.rank_list_image(
    [_solid((0, 0, 200)), _solid((0, 0, 100))],
    QUERY_IDENTITIES,
    QUERY_CAMERAS,
    gallery,
    GALLERY_IDENTITIES,
    GALLERY_CAMERAS,
    DISTMAT,
    query_indices=list(query_indices),
    topk=topk,
    thumb=THUMB,
  )


def test_rank_list_size_is_exact():
  # width = (topk + 1) * (16 + 2*4 + 2*3) + 12 = 4 * 30 + 12; height = 2 * (32 + 8 + 14 + 6).
  assert _problem_image().size == (132, 120)
  assert vis.rank_list_size(2, 3, THUMB) == (132, 120)
  assert vis.rank_list_size(8, 10) == (11 * (64 + 14) + 12, 8 * (128 + 28))
  assert _problem_image(topk=1, query_indices=[1]).size == (2 * 30 + 12, 60)


def test_rank_list_frames_order_and_same_camera_filtering():
  image = _problem_image()
  # Query 0 (identity 1, camera 0): g0 removed; then g1 (identity 2: wrong), g2 (identity 1:
  # right), g3 (wrong).
  assert _frame_colour(image, 0, 0) == vis.QUERY
  assert _thumb_colour(image, 0, 0) == (0, 0, 200)
  assert [_thumb_colour(image, 0, c) for c in (1, 2, 3)] == [
    GALLERY_COLOURS[1],
    GALLERY_COLOURS[2],
    GALLERY_COLOURS[3],
  ]
  assert [_frame_colour(image, 0, c) for c in (1, 2, 3)] == [vis.WRONG, vis.CORRECT, vis.WRONG]
  # Query 1 (identity 3, camera 2): g3 removed; g4 (identity 3, camera 0: right), g2 (wrong), g1
  # (wrong).
  assert [_thumb_colour(image, 1, c) for c in (1, 2, 3)] == [
    GALLERY_COLOURS[4],
    GALLERY_COLOURS[2],
    GALLERY_COLOURS[1],
  ]
  assert [_frame_colour(image, 1, c) for c in (1, 2, 3)] == [vis.CORRECT, vis.WRONG, vis.WRONG]
  # The skipped same-identity-same-camera image appears nowhere in its query's row.
  pixels = np.asarray(image)
  row0 = pixels[:ROW]
  assert not np.all(row0 == GALLERY_COLOURS[0], axis=-1).any()
  row1 = pixels[ROW:]
  assert not np.all(row1 == GALLERY_COLOURS[3], axis=-1).any()


def test_rank_list_leaves_slots_blank_when_few_entries_are_kept():
  # Query 0 keeps 4 of the 5 gallery images; slot 5 of topk=5 stays background.
  image = _problem_image(topk=5, query_indices=[0])
  assert _frame_colour(image, 0, 4) == vis.WRONG  # g4: identity 3.
  assert _frame_colour(image, 0, 5) == vis.BACKGROUND
  assert _thumb_colour(image, 0, 5) == vis.BACKGROUND


def test_rank_list_ties_keep_gallery_order():
  order = vis.ranked_gallery(
    np.array([0.5, 0.1, 0.1, 0.1]), 7, 0, np.array([1, 2, 7, 3]), np.array([0, 0, 0, 1]), topk=3
  )
  assert order.tolist() == [1, 3, 0]  # g2 (same identity and camera) removed; ties by index.


def test_rank_list_reads_files_and_draws_unreadable_ones_grey(tmp_path):
  paths = []
  for i, colour in enumerate(GALLERY_COLOURS):
    path = tmp_path / f"g{i}.png"
    Image.fromarray(_solid(colour)).save(path)
    paths.append(str(path))
  from_arrays = _problem_image()
  from_files = _problem_image(gallery=paths)
  np.testing.assert_array_equal(np.asarray(from_files), np.asarray(from_arrays))

  paths[1] = str(tmp_path / "missing.jpg")
  image = _problem_image(gallery=paths)
  assert _thumb_colour(image, 0, 1) == (160, 160, 160)
  assert _frame_colour(image, 0, 1) == vis.WRONG


def test_save_rank_list_and_records_helper(tmp_path):
  from ccreid_jax.data.datasets import Record

  gallery_paths = []
  for i, colour in enumerate(GALLERY_COLOURS):
    gallery_paths.append(str(tmp_path / f"g{i}.png"))
    Image.fromarray(_solid(colour)).save(gallery_paths[-1])
  query_paths = [str(tmp_path / "q0.png"), str(tmp_path / "q1.png")]
  Image.fromarray(_solid((0, 0, 200))).save(query_paths[0])
  Image.fromarray(_solid((0, 0, 100))).save(query_paths[1])
  query = [Record(p, i, c) for p, i, c in zip(query_paths, QUERY_IDENTITIES, QUERY_CAMERAS)]
  gallery = [Record(p, i, c) for p, i, c in zip(gallery_paths, GALLERY_IDENTITIES, GALLERY_CAMERAS)]
  image = vis.rank_list_from_records(
    query, gallery, DISTMAT, query_indices=[0, 1], topk=3, thumb=THUMB
  )
  np.testing.assert_array_equal(np.asarray(image), np.asarray(_problem_image()))

  out = tmp_path / "sub" / "ranklist.png"
  saved = vis.save_rank_list(
    str(out),
    [_solid((0, 0, 200)), _solid((0, 0, 100))],
    QUERY_IDENTITIES,
    QUERY_CAMERAS,
    [_solid(c) for c in GALLERY_COLOURS],
    GALLERY_IDENTITIES,
    GALLERY_CAMERAS,
    DISTMAT,
    query_indices=[0, 1],
    topk=3,
    thumb=THUMB,
  )
  with Image.open(out) as reread:
    np.testing.assert_array_equal(np.asarray(reread.convert("RGB")), np.asarray(saved))


def test_rank_list_rejects_inconsistent_inputs():
  with pytest.raises(ValueError, match="distmat"):
    vis.rank_list_image(
      [_solid(0)] * 2,
      QUERY_IDENTITIES,
      QUERY_CAMERAS,
      [_solid(0)] * 5,
      GALLERY_IDENTITIES,
      GALLERY_CAMERAS,
      DISTMAT.T,
      query_indices=[0],
    )
  with pytest.raises(ValueError, match="out of range"):
    _problem_image(query_indices=[2])


def test_search_rank_list_draws_the_given_order_unfiltered_and_unmarked():
  queries = [_solid((0, 0, 200)), _solid((0, 0, 100))]
  gallery = [_solid(c) for c in GALLERY_COLOURS]
  # Row 0 includes g0, which rank_list_image would drop (the query's identity and camera).
  indices = np.array([[0, 3, 1], [4, 4, 2]])
  distances = np.array([[0.0, 0.25, 0.5], [0.125, 0.125, 1.75]])
  image = vis.search_rank_list_image(queries, gallery, indices, distances, thumb=THUMB)
  assert image.size == vis.rank_list_size(2, 3, THUMB) == (132, 120)
  for r in range(2):
    assert _frame_colour(image, r, 0) == vis.QUERY
    assert _thumb_colour(image, r, 0) == tuple(queries[r][0, 0])
    for c in (1, 2, 3):
      assert _frame_colour(image, r, c) == vis.NEUTRAL
      assert _thumb_colour(image, r, c) == GALLERY_COLOURS[indices[r, c - 1]]
  # Files work as arrays do, and other distances change only the labels.
  again = vis.search_rank_list_image(queries, gallery, indices, distances + 0.5, thumb=THUMB)
  assert (np.asarray(again) != np.asarray(image)).any()
  _, y = _cell_origin(0, 1)
  label_top = y + THUMB[0] + 2 * vis.BORDER
  np.testing.assert_array_equal(np.asarray(again)[:label_top], np.asarray(image)[:label_top])


def test_search_rank_list_rejects_inconsistent_inputs():
  queries, gallery = [_solid(0)] * 2, [_solid(0)] * 5
  with pytest.raises(ValueError, match="one shape"):
    vis.search_rank_list_image(queries, gallery, np.zeros((2, 3), int), np.zeros((2, 2)))
  with pytest.raises(ValueError, match="query images"):
    vis.search_rank_list_image(queries, gallery, np.zeros((3, 1), int), np.zeros((3, 1)))
  with pytest.raises(ValueError, match=r"\[0, 5\)"):
    vis.search_rank_list_image(queries, gallery, np.full((2, 1), 5), np.zeros((2, 1)))


def test_choose_queries_is_seeded_distinct_and_clipped():
  a = vis.choose_queries(100, 8, seed=3)
  assert a.tolist() == vis.choose_queries(100, 8, seed=3).tolist()
  assert a.tolist() != vis.choose_queries(100, 8, seed=4).tolist()
  assert len(set(a.tolist())) == 8 and a.tolist() == sorted(a.tolist())
  assert a.min() >= 0 and a.max() < 100
  assert vis.choose_queries(5, 8, seed=0).tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------
# Training curves.
# ---------------------------------------------------------------------------------------


def _records(num_epochs=6, initial=True, offset=0.0):
  records = [{"kind": "initial", "mAP": 0.02, "rank1": 0.08, "time": 1.0}] if initial else []
  for e in range(num_epochs):
    record = {
      "kind": "epoch",
      "epoch": e,
      "clusters": 40 + 5 * e,
      "outliers": 30 - 3 * e,
      "loss": 4.0 - 0.4 * e + offset,
      "time": 2.0 + e,
    }
    if e % 2 == 1:
      record.update(mAP=0.1 + 0.05 * e + offset, rank1=0.3 + 0.05 * e)
    records.append(record)
  return records


def _mask(image, colour, box=None):
  pixels = np.asarray(image)
  if box is not None:
    left, top, right, bottom = box
    pixels = pixels[top:bottom, left:right]
  return np.all(pixels == colour, axis=-1)


def test_training_curves_size_and_determinism(tmp_path):
  image = vis.training_curves_image(_records())
  assert image.size == vis.CURVES_SIZE == (900, 600)
  assert image.mode == "RGB"
  again = vis.training_curves_image(_records())
  np.testing.assert_array_equal(np.asarray(image), np.asarray(again))
  other = vis.training_curves_image(_records(offset=0.1))
  assert (np.asarray(image) != np.asarray(other)).any()

  path = tmp_path / "curves.png"
  saved = vis.save_training_curves(str(path), _records())
  with Image.open(path) as reread:
    assert reread.size == (900, 600)
    np.testing.assert_array_equal(np.asarray(reread.convert("RGB")), np.asarray(saved))


def test_training_curves_panels_hold_their_series():
  image = vis.training_curves_image(_records())
  top_left, top_right = (0, 0, 450, 300), (450, 0, 900, 300)
  bottom_left, bottom_right = (0, 300, 450, 600), (450, 300, 900, 600)
  colours = vis.SERIES_COLOURS
  for name, panel in (
    ("mAP", top_left),
    ("rank-1", top_left),
    ("clusters", top_right),
    ("outliers", bottom_left),
    ("loss", bottom_right),
  ):
    inside = _mask(image, colours[name], panel).sum()
    assert inside > 50, name
    assert _mask(image, colours[name]).sum() == inside, f"{name} drawn outside its panel"

  # Without any evaluation, the evaluation panel holds no series (legend aside: it is drawn
  # only above the plot area) and says "no data".
  no_eval = [r for r in _records(initial=False) if "mAP" not in r]
  image = vis.training_curves_image(no_eval)
  assert not _mask(image, colours["mAP"]).any()
  assert _mask(image, colours["clusters"]).any()


def test_training_curves_put_the_initial_evaluation_first():
  plot = (0, 30, 450, 300)  # The evaluation panel below its title line.
  with_initial = _mask(vis.training_curves_image(_records()), vis.SERIES_COLOURS["mAP"], plot)
  without = _mask(
    vis.training_curves_image(_records(initial=False)), vis.SERIES_COLOURS["mAP"], plot
  )

  def first_x(mask):
    return np.nonzero(mask.any(axis=0))[0].min()

  # x = -1 ("init") is the left edge of the plot area: left of epoch 1's point.
  assert first_x(with_initial) < first_x(without)
  assert first_x(with_initial) <= 60


def test_training_curves_last_record_of_an_epoch_wins_and_nan_is_skipped():
  records = _records()
  stale = dict(records[3], clusters=999, loss=float("nan"))  # epoch 2 of a killed attempt
  resumed = records[:4] + [stale] + records[3:]
  np.testing.assert_array_equal(
    np.asarray(vis.training_curves_image(resumed)), np.asarray(vis.training_curves_image(records))
  )
  with_nan = [dict(r, loss=float("nan")) if r.get("epoch") == 2 else r for r in records]
  image = vis.training_curves_image(with_nan)  # Draws; the gap is simply left out.
  assert image.size == (900, 600)
  assert (np.asarray(image) != np.asarray(vis.training_curves_image(records))).any()


def test_training_curves_outliers_as_fraction_with_num_train():
  records = _records()
  as_count = vis.training_curves_image(records)
  as_fraction = vis.training_curves_image(records, num_train=100)
  panel = (0, 300, 450, 600)
  left, top, right, bottom = panel
  assert (
    np.asarray(as_count)[top:bottom, left:right] != np.asarray(as_fraction)[top:bottom, left:right]
  ).any()
  # Other panels do not change.
  np.testing.assert_array_equal(np.asarray(as_count)[:300], np.asarray(as_fraction)[:300])


def test_training_curves_of_an_empty_history():
  image = vis.training_curves_image([])
  assert image.size == (900, 600)
  assert not any(_mask(image, c).any() for c in vis.SERIES_COLOURS.values())
