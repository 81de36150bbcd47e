"""A folder of the user's own images (``data.name = "folder"``): cameras from a folder level, a
file-name regex or none, the evaluation list file, the problems reported, ``load_run_data``'s
``RunData`` without evaluation, the config checks, plain PxK batches without cameras, and
short training runs.

The images are the tiny generated Market-1501 train split copied under arbitrary names.
"""

import logging
import os
import shutil

import numpy as np
import pytest

from ccreid_jax import checkpoint as checkpoint_lib
from ccreid_jax import commands, feature_files, inference, train
from ccreid_jax import run as run_lib
from ccreid_jax.data import datasets, loading
from ccreid_jax.data.cache import ImageDecodeError
from ccreid_jax.data.datasets import DatasetError, load_folder_dataset, read_eval_list
from ccreid_jax.data.sampler import CameraAwarePKSampler
from ccreid_jax.validation import ConfigError, validate_config

from conftest import tiny_config

# Market camera -> the camera folder / file-name camera of the copies. Sorted with numbers by
# value: gate2 < gate10 < lobby (a plain string sort would put gate10 first).
FOLDER_NAMES = {1: "gate10", 2: "lobby", 3: "gate2"}
FOLDER_CAMERAS = {"gate2": 0, "gate10": 1, "lobby": 2}
REGEX_NAMES = {1: "10", 2: "7", 3: "2"}
REGEX_CAMERAS = {"2": 0, "7": 1, "10": 2}


def _market_files(root: str, split: str) -> list[tuple[str, int, int]]:
  """``(path, identity, camera)`` of a split of the tiny Market-1501 tree, sorted."""
  folder = os.path.join(root, "Market-1501-v15.09.15", split)
  out = []
  for name in sorted(os.listdir(folder)):
    identity, rest = name.split("_c", 1)
    out.append((os.path.join(folder, name), int(identity), int(rest[0])))
  return out


def _copy_train(tiny_market: str, dest: str, layout: str) -> dict[str, tuple[int, int]]:
  """Copies the train images to ``dest`` under names that carry no identity.

  ``layout``: "folder" (``<day>/<camera>/shot_N.jpg``, the camera at level 2), "regex"
  (``IMG_N_cam<camera>.jpeg``) or "none" (``a/b/<N>.jpg``, some upper-case ``.JPG``).
  Returns ``{new path: (market identity, market camera)}``.
  """
  copied = {}
  for i, (path, identity, camera) in enumerate(_market_files(tiny_market, "bounding_box_train")):
    if layout == "folder":
      new = os.path.join(dest, f"day{1 + i % 2}", FOLDER_NAMES[camera], f"shot_{i:03d}.jpg")
    elif layout == "regex":
      new = os.path.join(dest, f"IMG_{i:04d}_cam{REGEX_NAMES[camera]}.jpeg")
    else:
      new = os.path.join(
        dest,
        "a" if i % 3 else os.path.join("a", "b"),
        f"{(i * 7919) % 1000:03d}_{i}.{'JPG' if i % 5 == 0 else 'jpg'}",
      )
    os.makedirs(os.path.dirname(new), exist_ok=True)
    shutil.copyfile(path, new)
    copied[new] = (identity, camera)
  return copied


@pytest.fixture(scope="module")
def own(tiny_market, tmp_path_factory):
  """``{layout: (root, copied)}`` for the three layouts, plus an evaluation set with its list
  file (``"eval"``: (list path, [(split, path, identity, market camera)]))."""
  base = tmp_path_factory.mktemp("own")
  trees = {
    layout: (str(base / layout), _copy_train(tiny_market, str(base / layout), layout))
    for layout in ("folder", "regex", "none")
  }
  evalset = base / "evalset"
  entries = []
  lines = ["# labelled images of my own", ""]
  for split, source in (("query", "query"), ("gallery", "bounding_box_test")):
    os.makedirs(evalset / split)
    for i, (path, identity, camera) in enumerate(_market_files(tiny_market, source)):
      if identity < 0:
        continue
      new = str(evalset / split / f"{i:03d}.jpg")
      shutil.copyfile(path, new)
      written = new if i % 4 == 0 else os.path.relpath(new, evalset)  # absolute or relative
      lines.append(f"{split} {written} {identity} cam{camera}  # from {os.path.basename(path)}")
      entries.append((split, new, identity, camera))
  (evalset / "list.txt").write_text("\n".join(lines) + "\n")
  trees["eval"] = (str(evalset / "list.txt"), entries)
  return trees


def _folder_config(root: str, **data):
  config = tiny_config(root)
  config.data.name = "folder"
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


# ---------------------------------------------------------------------------------------
# Cameras.
# ---------------------------------------------------------------------------------------


def test_cameras_from_a_folder_level(own):
  root, copied = own["folder"]
  ds = load_folder_dataset(root, cameras="folder", camera_folder_level=2)
  assert sorted(r.path for r in ds.train) == sorted(copied)
  assert ds.camera_names == ("gate2", "gate10", "lobby") and ds.has_cameras
  for r in ds.train:
    assert r.identity == datasets.UNKNOWN_IDENTITY
    assert r.camera == FOLDER_CAMERAS[FOLDER_NAMES[copied[r.path][1]]]
  assert not ds.has_train_identities and not ds.has_eval and ds.query == [] and ds.gallery == []
  # Level 1 is the day folder: two "cameras".
  assert load_folder_dataset(root, cameras="folder").camera_names == ("day1", "day2")


def test_cameras_from_a_file_name_regex(own):
  root, copied = own["regex"]
  ds = load_folder_dataset(root, cameras="regex", camera_regex=r"cam(\d+)\.")
  assert ds.camera_names == ("2", "7", "10")
  assert [r.camera for r in ds.train] == [
    REGEX_CAMERAS[REGEX_NAMES[copied[r.path][1]]] for r in ds.train
  ]
  # Without a group the whole match names the camera.
  ds = load_folder_dataset(root, cameras="regex", camera_regex=r"cam\d+")
  assert ds.camera_names == ("cam2", "cam7", "cam10")


def test_no_cameras_every_image_is_camera_zero(own):
  root, copied = own["none"]
  ds = load_folder_dataset(root)
  assert sorted(r.path for r in ds.train) == sorted(copied)  # upper-case .JPG included
  assert {r.camera for r in ds.train} == {0} and not ds.has_cameras and ds.camera_names == ()
  assert ds.summary().splitlines()[2].split("|")[1:4:2] == ["          - ", "       -"]  # unknown


def test_without_cameras_the_camera_aware_sampler_draws_plain_pk_batches():
  """All cameras 0: the batches of CameraAwarePKSampler equal those of the reference's
  no-camera sampler (anchor + K-1 other images of its class, without replacement when the
  class has K others or more; a one-image class gives its anchor alone), written out here.
  With real cameras the same labels and seed give other batches."""
  rng = np.random.default_rng(3)
  labels = rng.integers(-1, 12, size=150)
  labels[labels == 5] = -1
  labels[np.flatnonzero(labels == 7)[1:]] = -1  # class 7: one image
  k, batch_size, num_batches, seed = 4, 16, 25, 11

  def plain_pk():
    draw = np.random.default_rng(seed)
    classes = np.unique(labels[labels >= 0])
    stream = []
    while len(stream) < num_batches * batch_size:
      for c in draw.permutation(len(classes)):
        members = np.flatnonzero(labels == classes[c])
        anchor = int(draw.integers(members.size))
        stream.append(members[anchor])
        if members.size > 1:
          others = np.delete(members, anchor)
          stream += list(draw.choice(others, size=k - 1, replace=others.size < k))
    return [stream[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]

  zeros = CameraAwarePKSampler(labels, np.zeros_like(labels), k, seed=seed)
  batches = [list(b) for b in zeros.batches(num_batches, batch_size)]
  assert batches == [[int(i) for i in b] for b in plain_pk()]
  with_cameras = CameraAwarePKSampler(labels, np.arange(labels.size) % 3, k, seed=seed)
  assert [list(b) for b in with_cameras.batches(num_batches, batch_size)] != batches


# ---------------------------------------------------------------------------------------
# Problems in the folder.
# ---------------------------------------------------------------------------------------


def _tree(tmp_path, own, count: int, layout: str = "none") -> str:
  """The first ``count`` images of a layout copied to ``tmp_path/imgs`` (same relative paths)."""
  root, copied = own[layout]
  dest = tmp_path / "imgs"
  for path in sorted(copied)[:count]:
    new = dest / os.path.relpath(path, root)
    os.makedirs(new.parent, exist_ok=True)
    shutil.copyfile(path, new)
  return str(dest)


def test_empty_folder_and_unknown_files(tmp_path, own, caplog):
  (tmp_path / "empty").mkdir()
  with pytest.raises(DatasetError, match="no image file .* under data.root"):
    load_folder_dataset(str(tmp_path / "empty"))
  root = _tree(tmp_path, own, 12)
  for name in ("notes.txt", "labels.csv", ".DS_Store", "._0001.jpg"):
    (tmp_path / "imgs" / name).write_text("not an image")
  os.makedirs(tmp_path / "imgs" / ".thumbnails")
  shutil.copyfile(sorted(own["none"][1])[0], tmp_path / "imgs" / ".thumbnails" / "t.jpg")
  with caplog.at_level(logging.INFO, logger="ccreid_jax"):
    ds = load_folder_dataset(root)
  assert len(ds.train) == 12
  assert "ignored 4 file(s) that are not images" in caplog.text
  with pytest.raises(DatasetError, match=r"not a folder"):
    load_folder_dataset(str(tmp_path / "missing"))


def test_too_few_images_names_the_minimum(tmp_path, own):
  assert datasets.folder_min_images(4, 4) == 8 and datasets.folder_min_images(16, 4) == 32
  root = _tree(tmp_path, own, 7)
  with pytest.raises(DatasetError) as info:
    load_folder_dataset(root, min_images=datasets.folder_min_images(4, 4))
  assert "7 usable training image(s)" in str(info.value) and "at least 8" in str(info.value)
  assert "train.num_instances" in str(info.value)
  assert len(load_folder_dataset(root, min_images=7).train) == 7


def test_regex_matching_no_file_names_the_regex_and_a_file(own):
  root, copied = own["regex"]
  with pytest.raises(DatasetError) as info:
    load_folder_dataset(root, cameras="regex", camera_regex=r"_c(\d+)_")
  message = str(info.value)
  assert r"'_c(\d+)_'" in message and f"'{os.path.basename(min(copied))}'" in message
  assert "data.camera_regex" in message and "--config.data.cameras=none" in message


def test_files_without_a_camera_are_listed_or_skipped(tmp_path, own, caplog):
  root = _tree(tmp_path, own, 20, "regex")
  for i in range(12):
    shutil.copyfile(sorted(own["regex"][1])[0], tmp_path / "imgs" / f"holiday_{i:02d}.jpg")
  with pytest.raises(DatasetError) as info:
    load_folder_dataset(root, cameras="regex", camera_regex=r"cam(\d+)")
  message = str(info.value)
  assert "12 image(s) get no camera" in message and "holiday_00.jpg" in message
  assert "... and 2 more" in message and "--config.data.skip_bad_names=True" in message
  with caplog.at_level(logging.WARNING, logger="ccreid_jax"):
    ds = load_folder_dataset(root, cameras="regex", camera_regex=r"cam(\d+)", skip_bad_names=True)
  assert len(ds.train) == 20 and len(ds.skipped) == 12
  assert "skipped 12 image(s) without a camera" in caplog.text
  # An image lying above the camera level.
  root = _tree(tmp_path / "f", own, 10, "folder")
  shutil.copyfile(sorted(own["folder"][1])[0], tmp_path / "f" / "imgs" / "day1" / "loose.jpg")
  with pytest.raises(DatasetError, match="lies in 1 sub-folder"):
    load_folder_dataset(root, cameras="folder", camera_folder_level=2)


def test_a_camera_with_one_image_is_warned_about(tmp_path, own, caplog):
  root = _tree(tmp_path, own, 10, "folder")
  os.makedirs(tmp_path / "imgs" / "day1" / "roof")
  shutil.copyfile(sorted(own["folder"][1])[0], tmp_path / "imgs" / "day1" / "roof" / "x.jpg")
  with caplog.at_level(logging.INFO, logger="ccreid_jax"):
    ds = load_folder_dataset(root, cameras="folder", camera_folder_level=2)
  assert "roof" in ds.camera_names
  assert "1 camera(s) with a single image: 'roof'" in caplog.text
  assert "'gate10' -> 0, 'roof' -> 1" in caplog.text  # the mapping is logged


def test_links_leading_outside_the_folder(tmp_path, own):
  root = _tree(tmp_path, own, 10)
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  shutil.copyfile(sorted(own["none"][1])[0], outside / "far.jpg")
  os.symlink(outside, tmp_path / "imgs" / "linked")
  with pytest.raises(DatasetError) as info:
    load_folder_dataset(root)
  assert "far.jpg is a link to" in str(info.value)
  assert "--config.data.follow_symlinks_outside=True" in str(info.value)
  assert len(load_folder_dataset(root, allow_outside_links=True).train) == 11
  # A link loop is walked once.
  os.symlink(tmp_path / "imgs", tmp_path / "imgs" / "a" / "loop")
  assert len(load_folder_dataset(root, allow_outside_links=True).train) == 11


def test_unreadable_images_are_skipped_when_asked(tmp_path, own, caplog):
  root = _tree(tmp_path, own, 12)
  (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
  config = _folder_config(root)
  with pytest.raises(ImageDecodeError, match="broken.jpg"):
    loading.load_run_data(config, str(tmp_path / "w1"), need_train=True)
  config.data.skip_bad_images = True
  with caplog.at_level(logging.WARNING, logger="ccreid_jax"):
    data = loading.load_run_data(config, str(tmp_path / "w2"), need_train=True)
  assert data.num_train == 12 and data.train_images.shape[0] == 12
  assert not data.has_eval and data.test_images is None
  assert "skipped 1 unreadable image(s)" in caplog.text
  assert any("broken.jpg" in s for s in data.dataset.skipped)
  # Too few left once the unreadable ones are gone: 14 files listed, 12 readable.
  (tmp_path / "imgs" / "broken2.jpg").write_bytes(b"")
  config.train.num_instances = config.cluster.min_samples = 7
  with pytest.raises(DatasetError, match="12 usable training image.*at least 14"):
    loading.load_run_data(config, str(tmp_path / "w3"), need_train=True)


# ---------------------------------------------------------------------------------------
# The evaluation list.
# ---------------------------------------------------------------------------------------


def test_eval_list_gives_query_and_gallery(own):
  list_path, entries = own["eval"]
  query, gallery = read_eval_list(list_path)
  cameras = sorted({camera for *_, camera in entries})
  expected = {
    s: [
      (p, identity, cameras.index(camera)) for split, p, identity, camera in entries if split == s
    ]
    for s in ("query", "gallery")
  }
  assert [tuple(r) for r in query] == expected["query"]
  assert [tuple(r) for r in gallery] == expected["gallery"]


def test_eval_list_malformed_lines_name_the_file_and_line(tmp_path):
  good = "query a.jpg 1 c1\ngallery b.jpg 1 c2\n"
  for bad in (
    "probe a.jpg 1 c1",
    "query a.jpg c1",
    "query a.jpg x c1",
    "query a.jpg -1 c1",
    "query a b.jpg 1 c1",
  ):
    path = tmp_path / "list.txt"
    path.write_text(good + "\n" + bad + "\n")
    with pytest.raises(DatasetError) as info:
      read_eval_list(str(path))
    assert f"{path} line 4 is malformed" in str(info.value) and bad in str(info.value)
    assert "query|gallery <path> <identity> <camera>" in str(info.value)
  path.write_text("query a.jpg 1 c1\n")
  with pytest.raises(DatasetError, match="no gallery line"):
    read_eval_list(str(path))
  with pytest.raises(DatasetError, match="is not a file"):
    read_eval_list(str(tmp_path / "none.txt"))


def test_eval_list_paths_outside_its_folder_are_refused(tmp_path):
  (tmp_path / "lists").mkdir()
  path = tmp_path / "lists" / "list.txt"
  path.write_text(
    f"query a.jpg 1 c1\ngallery ../secret.jpg 1 c2\ngallery {tmp_path}/other/b.jpg 2 c2\n"
  )
  with pytest.raises(DatasetError) as info:
    read_eval_list(str(path))
  message = str(info.value)
  assert f"{path} line 2" in message and "'../secret.jpg'" in message
  assert f"{path} line 3" in message and "--config.data.follow_symlinks_outside=True" in message
  _, gallery = read_eval_list(str(path), allow_outside_links=True)
  assert [r.path for r in gallery] == [
    str(tmp_path / "secret.jpg"),
    str(tmp_path / "other" / "b.jpg"),
  ]


# ---------------------------------------------------------------------------------------
# load_run_data and the config.
# ---------------------------------------------------------------------------------------


def test_run_data_without_and_with_evaluation(own, tmp_path, tiny_market):
  root, copied = own["none"]
  config = _folder_config(root)
  data = loading.load_run_data(config, str(tmp_path / "w"), need_train=True)
  assert not data.has_eval and data.test_images is None
  assert not data.has_train_identities and data.train_identities is None
  assert not data.has_train_cameras
  assert data.train_images.shape == (len(copied), 32, 16, 3)
  assert np.all(data.train_cameras == 0)
  with pytest.raises(ConfigError, match="config.eval.list"):
    loading.load_run_data(config, str(tmp_path / "w"), need_train=False)

  # A list file inside data.root: its images are evaluated, not trained on.
  list_path, entries = own["eval"]
  inside = tmp_path / "with_eval"
  shutil.copytree(root, inside / "train")
  shutil.copytree(os.path.dirname(list_path), inside / "evalset")
  copied_list = inside / "evalset" / "list.txt"  # its absolute paths name the copies
  copied_list.write_text(
    copied_list.read_text().replace(os.path.dirname(list_path), str(inside / "evalset"))
  )
  config = _folder_config(str(inside))
  config.eval.list = str(inside / "evalset" / "list.txt")
  data = loading.load_run_data(config, str(tmp_path / "w"), need_train=True)
  assert data.has_eval and not data.cross_domain and data.num_train == len(copied)
  assert (
    data.test_images.shape[0]
    == len(entries)
    == len(data.eval_dataset.query) + len(data.eval_dataset.gallery)
  )
  evaluation_only = loading.load_run_data(config, str(tmp_path / "w"), need_train=False)
  np.testing.assert_array_equal(evaluation_only.test_images, data.test_images)

  # A labelled benchmark as the evaluation set.
  config = _folder_config(root)
  config.eval.dataset, config.eval.root = "market1501", tiny_market
  data = loading.load_run_data(config, str(tmp_path / "w"), need_train=True)
  assert data.cross_domain and data.has_eval and data.num_train == len(copied)
  assert data.eval_dataset.name == "market1501" and data.dataset.name == "folder"


def test_config_checks_of_the_folder_fields(own, tmp_path):
  root, _ = own["none"]
  config = _folder_config(root)
  validate_config(config, num_devices=1, training=True)
  config.cluster.distance = "ca_jaccard"
  config.camera.enabled = True
  with pytest.raises(ConfigError) as info:
    validate_config(config, num_devices=1)
  message = str(info.value)
  assert "2 problems" in message
  for field in (
    "config.cluster.distance",
    "config.camera.enabled",
    "config.data.cameras='none'",
    "config.data.name='folder'",
  ):
    assert field in message
  config.data.cameras = "folder"
  validate_config(config, num_devices=1)  # with cameras, camera-aware training may run

  config = _folder_config(root, cameras="regex", camera_regex="c(\\d+", source="tfds")
  config.eval.list = str(tmp_path / "missing.txt")
  config.eval.dataset = "market1501"
  with pytest.raises(ConfigError) as info:
    validate_config(config, num_devices=1)
  message = str(info.value)
  assert "config.data.camera_regex = 'c(\\\\d+': is not a regular expression" in message
  assert "config.data.source = 'tfds'" in message and "file not found" in message
  assert "config.eval.dataset='market1501' both name" in message
  config = tiny_config(root)  # a benchmark with a list file
  config.eval.list = own["eval"][0]
  with pytest.raises(ConfigError, match="config.data.name='folder' only"):
    validate_config(config, num_devices=1)
  config = _folder_config(root, cameras="cameras", camera_folder_level=0)
  config.eval.root = root
  with pytest.raises(ConfigError) as info:
    validate_config(config, num_devices=1)
  message = str(info.value)
  assert "config.data.cameras = 'cameras'" in message and "camera_folder_level = 0" in message
  assert "config.eval.root" in message


def test_custom_config_reads_a_folder(own):
  from ccreid_jax.configs import custom

  config = custom.get_config()
  assert config.data.name == "folder" and config.data.cameras == "none"
  config.data.root = own["none"][0]
  validate_config(config, num_devices=1)


# ---------------------------------------------------------------------------------------
# Training on a folder.
# ---------------------------------------------------------------------------------------


def _short_run(config, workdir):

  config.train.epochs, config.train.iters = 1, 2
  config.cluster.min_samples = 2
  results = train.train_and_evaluate(config, workdir)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "1"))
  records = [r for r in run_lib.Run(workdir).metrics_lines()[0] if r["kind"] == "epoch"]
  assert [r["epoch"] for r in records] == [0] and records[0]["steps"] == 2
  return results, records[0]


@pytest.mark.slow
def test_training_on_camera_folders_with_an_eval_list(own, tmp_path):
  """Trains, evaluates on the list, and the eps sweep reads the checkpoint (no ARI: the
  train identities are not known)."""

  root, copied = own["folder"]
  config = _folder_config(root, cameras="folder", camera_folder_level=2)
  config.eval.list = own["eval"][0]
  workdir = str(tmp_path / "run")
  results, record = _short_run(config, workdir)
  assert 0.0 <= results["mAP"] <= 1.0 and "mAP" in record
  assert "cluster_ari" not in record  # the train identities are not known
  assert "camera_ari" in record
  sweep = commands.sweep(config, workdir, [0.5, 0.6], checkpoint="latest", out=workdir)
  assert (sweep["checkpoint"], sweep["epoch"], sweep["num_train"]) == ("1", 0, len(copied))
  assert not sweep["has_train_identities"] and all("ari" not in r for r in sweep["rows"])
  assert os.path.isfile(os.path.join(workdir, "eps_sweep_1.png"))


@pytest.mark.slow
def test_training_without_cameras_or_evaluation(own, tmp_path):
  root, _ = own["none"]
  config = _folder_config(root)
  workdir = str(tmp_path / "run")
  results, record = _short_run(config, workdir)
  assert "mAP" not in record and "cluster_ari" not in record and "camera_ari" not in record
  assert results == {"epoch": 0, "checkpoints": [1]}
  # No checkpoint was evaluated: the default ("best") loads the latest; "best" asked for
  # says there is none.
  checkpoint = run_lib.Run(workdir).load_model(config).checkpoint
  assert (checkpoint.number, checkpoint.epoch, checkpoint.name) == (1, 0, "latest")
  source = inference.Embedder.from_workdir(workdir).source
  assert (source["checkpoint"], source["number"]) == ("latest", 1)
  with pytest.raises(checkpoint_lib.CheckpointNotFoundError, match="No evaluated checkpoint"):
    run_lib.Run(workdir).load_model(config, "best")
  # What can be known without labels is logged instead.
  assert {"clusters", "outliers", "largest_cluster", "cluster_sizes", "intra_similarity"} <= set(
    record
  )


# ---------------------------------------------------------------------------------------
# File names that are not valid UTF-8 (issue 38, item 1).
# ---------------------------------------------------------------------------------------

NOT_UTF8 = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: Python holds them as 'caf\udce9.jpg'


def test_the_fingerprint_of_utf8_names_is_the_one_of_existing_workdirs():
  """The value the fingerprint had before names that are not UTF-8 were handled: a workdir
  saved then still resumes."""
  records = [
    datasets.Record("/data/Market/bounding_box_train/0002_c1s1_000451_03.jpg", 2, 0),
    datasets.Record("/d/gate10/café_1.jpg", -1, 1),
    datasets.Record("rel/日本/x.png", -1, 2),
  ]
  assert loading.train_fingerprint(records) == "d3156c03a1578d75"
  odd = [datasets.Record(os.path.join("/d/gate10", NOT_UTF8), -1, 1)]
  same_bytes = [datasets.Record(os.path.join("/other/gate10", NOT_UTF8), -1, 1)]
  assert loading.train_fingerprint(odd) == loading.train_fingerprint(same_bytes)
  assert loading.train_fingerprint(odd) != loading.train_fingerprint(
    [datasets.Record("/d/gate10/café.jpg", -1, 1)]
  )


def test_search_results_print_names_that_are_not_utf8():
  records = [
    {"query": NOT_UTF8, "matches": [{"rank": 1, "path": "/g/" + NOT_UTF8, "distance": 0.5}]}
  ]
  text = inference.format_search_results(records)
  assert "caf\\xe9.jpg" in text
  text.encode("utf-8")  # printable on a strict UTF-8 stdout


def test_an_unreadable_image_not_named_in_utf8_is_listed_and_the_list_cached(tmp_path, own):
  from ccreid_jax.data import cache

  root = _tree(tmp_path, own, 4)
  broken = os.path.join(root, NOT_UTF8)
  with open(broken, "wb") as f:
    f.write(b"not a jpeg")
  paths = [r.path for r in datasets.load_folder_dataset(root).train]
  first = cache.load_readable_images(paths, 16, 8, str(tmp_path / "cache"), progress=False)
  again = cache.load_readable_images(paths, 16, 8, str(tmp_path / "cache"), progress=False)
  assert len(first.kept) == len(again.kept) == 4 and first.bad == again.bad
  assert len(first.bad) == 1 and repr(broken) in first.bad[0]


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_trains_resumes_and_is_written_back(own, tmp_path, caplog):
  """A train image and a query image named with bytes that are not UTF-8 (as
  ``printf 'caf\\xe9.jpg'`` makes them): found and logged at load time, trained on, resumed
  with the same fingerprint, evaluated, and written back with their bytes."""
  root, copied = own["folder"]
  tree = str(tmp_path / "imgs")
  shutil.copytree(root, tree)
  first = os.path.join(tree, os.path.relpath(min(copied), root))
  renamed = os.path.join(os.path.dirname(first), NOT_UTF8)
  os.rename(first, renamed)
  # The evaluation list names a query image in bytes that are not UTF-8 too.
  evalset = tmp_path / "evalset"
  lines = []
  for i, (split, path, identity, camera) in enumerate(own["eval"][1]):
    name = os.fsdecode(b"qu\xe9ry.jpg") if i == 0 else f"{i:03d}.jpg"
    new = os.path.join(str(evalset), split, name)
    os.makedirs(os.path.dirname(new), exist_ok=True)
    shutil.copyfile(path, new)
    written = os.path.relpath(new, evalset)
    lines.append(os.fsencode(f"{split} {written} {identity} cam{camera}"))
  (evalset / "list.txt").write_bytes(b"\n".join(lines) + b"\n")
  config = _folder_config(tree, cameras="folder", camera_folder_level=2)
  config.eval.list = str(evalset / "list.txt")
  workdir = str(tmp_path / "run")
  with caplog.at_level(logging.WARNING, logger="ccreid_jax"):
    data = loading.load_run_data(config, workdir, need_train=True)
  assert "2 image path(s) are not valid UTF-8" in caplog.text
  assert "caf\\xe9.jpg" in caplog.text and "qu\\xe9ry.jpg" in caplog.text
  assert renamed in [r.path for r in data.dataset.train]
  _short_run(config, workdir)
  config.train.epochs = 2  # resumes from checkpoint 1: the fingerprint matches
  train.train_and_evaluate(config, workdir)
  assert [r["epoch"] for r in run_lib.Run(workdir).epoch_records()] == [0, 1]
  for split, name in (("train", renamed), ("query", os.fsdecode(b"qu\xe9ry.jpg"))):
    out = str(tmp_path / f"{split}.npz")
    commands.extract(config, workdir, split=split, out=out, checkpoint="latest")
    paths = [os.fsencode(str(p)) for p in feature_files.read_features(out).paths]
    assert any(p.endswith(os.fsencode(os.path.basename(name))) for p in paths)
