"""Pretrained weights: safe torch checkpoint reading, torchvision -> Flax mapping, loading,
and the convert CLI. Checkpoints are built by hand (no torch) and, in the parity tests, with
torch.save from a torch ResNet that uses torchvision's exact module names."""

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccreid_jax.models import ReIDResNet, weights
from ccreid_jax.models.weights import (
  UnsafeCheckpointError,
  WeightsFormatError,
  WeightsMismatchError,
  load_pretrained,
  read_state_dict,
  torchvision_to_flax,
)
from ccreid_jax.tools import convert_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = jax.random.key(0)

# ----------------------------------------------------------------------------- helpers


def _abstract(model, h=32, w=16):
  return jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, h, w, 3)), train=False))


def _init_like(model, seed=0):
  """Concrete variables shaped like model.init, filled with numpy (no init compile)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.normal(0, 0.05, leaf.shape), leaf.dtype)
    value = {"scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0, "p": 3.0}[name]
    return jnp.full(leaf.shape, value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, _abstract(model))


def _numpy_state_dict(depth, width, ibn=False, seed=0):
  """A torchvision-named state dict (torch layouts) for ReIDResNet(depth, width, ibn),
  random values, plus the ignored extras (fc, num_batches_tracked)."""
  flat = weights.flatten_variables(_abstract(ReIDResNet(depth=depth, width=width, ibn=ibn)))
  rng = np.random.default_rng(seed)
  out = {}
  for torch_name, path in weights.trunk_names(depth, ibn).items():
    shape = weights._to_torch_shape(path, flat[path].shape)
    values = rng.uniform(0.5, 1.5, shape) if path.endswith("/var") else rng.normal(size=shape)
    out[torch_name] = values.astype(np.float32)
    if torch_name.endswith("running_var"):
      out[torch_name[: -len("running_var")] + "num_batches_tracked"] = np.array(7, np.int64)
  out["fc.weight"] = rng.normal(size=(10, flat["params/feat_bn/scale"].shape[0])).astype(np.float32)
  out["fc.bias"] = np.zeros(10, np.float32)
  return out


# A minimal protocol-2 pickle writer producing the same opcode structure as torch.save, so
# the torch-format readers are tested without torch.


def _p_str(s):
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _p_int(i):
  return b"J" + struct.pack("<i", i)


def _p_tuple(items):
  return b"(" + b"".join(items) + b"t"


def _p_global(module, name):
  return b"c" + f"{module}\n{name}\n".encode()


def _p_dict(items):
  body = b"".join(k + v for k, v in items)
  return b"}" + (b"(" + body + b"u" if items else b"")


def _p_tensor(key, storage_type, numel, offset, size, stride, legacy):
  pid = [
    _p_str("storage"),
    _p_global("torch", storage_type),
    _p_str(key),
    _p_str("cpu"),
    _p_int(numel),
  ]
  if legacy:
    pid.append(b"N")  # view_metadata None
  args = [
    _p_tuple(pid) + b"Q",
    _p_int(offset),
    _p_tuple([_p_int(v) for v in size]),
    _p_tuple([_p_int(v) for v in stride]),
    b"\x89",
    _p_global("collections", "OrderedDict") + b")R",
  ]
  return _p_global("torch._utils", "_rebuild_tensor_v2") + _p_tuple(args) + b"R"


_STORAGE_NAMES = {
  np.dtype(np.float32): "FloatStorage",
  np.dtype(np.float16): "HalfStorage",
  np.dtype(np.int64): "LongStorage",
}


def _hand_checkpoint(path, tensors, storages, *, legacy, wrap=None, big_endian=False):
  """Writes a torch.save-format file. ``storages``: key -> 1-D array; ``tensors``:
  name -> (key, offset, size, stride). ``wrap``: outer dict key holding the state dict."""
  items = []
  for name, (key, offset, size, stride) in tensors.items():
    data = storages[key]
    items.append(
      (
        _p_str(name),
        _p_tensor(key, _STORAGE_NAMES[data.dtype], data.size, offset, size, stride, legacy),
      )
    )
  obj = _p_dict(items)
  if wrap is not None:
    obj = _p_dict([(_p_str(wrap), obj), (_p_str("epoch"), _p_int(3))])
  pkl = b"\x80\x02" + obj + b"."
  order = ">" if big_endian else "<"
  if legacy:
    with open(path, "wb") as f:
      f.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
      f.write(pickle.dumps(1001, protocol=2))
      f.write(
        pickle.dumps(
          {
            "protocol_version": 1001,
            "little_endian": not big_endian,
            "type_sizes": {"short": 2, "int": 4, "long": 4},
          },
          protocol=2,
        )
      )
      f.write(pkl)
      keys = sorted(storages)
      f.write(pickle.dumps(keys, protocol=2))
      for key in keys:
        data = storages[key]
        f.write(struct.pack(order + "q", data.size))
        f.write(data.astype(data.dtype.newbyteorder(order)).tobytes())
  else:
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", pkl)
      z.writestr("archive/byteorder", "big" if big_endian else "little")
      for key, data in storages.items():
        z.writestr(f"archive/data/{key}", data.astype(data.dtype.newbyteorder(order)).tobytes())
      z.writestr("archive/version", "3\n")


def _hand_example():
  rng = np.random.default_rng(0)
  s0 = rng.normal(size=24).astype(np.float32)
  s1 = rng.normal(size=6).astype(np.float16)
  storages = {"0": s0, "1": s1, "2": np.array([42], np.int64)}
  tensors = {
    "conv.weight": ("0", 0, (2, 3, 2, 2), (12, 4, 2, 1)),  # contiguous
    "transposed": ("0", 0, (4, 6), (1, 4)),  # a .t() view: non-contiguous
    "offset_view": ("0", 5, (3, 2), (4, 2)),  # storage offset + strides
    "half": ("1", 0, (6,), (1,)),
    "bn.num_batches_tracked": ("2", 0, (), ()),  # 0-d
  }
  expected = {
    "conv.weight": s0.reshape(2, 3, 2, 2),
    "transposed": s0.reshape(6, 4).T,
    "offset_view": np.lib.stride_tricks.as_strided(s0[5:], (3, 2), (16, 8)),
    "half": s1,
    "bn.num_batches_tracked": np.array(42, np.int64),
  }
  return storages, tensors, expected


def _assert_same_dict(got, expected):
  assert sorted(got) == sorted(expected)
  for k in expected:
    assert got[k].dtype == expected[k].dtype, k
    assert got[k].shape == expected[k].shape, k
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def _write_safetensors(path, arrays, codes=None):
  codes = codes or {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
  }
  header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
  for name, a in arrays.items():
    b = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
    header[name] = {
      "dtype": codes[a.dtype],
      "shape": list(a.shape),
      "data_offsets": [offset, offset + len(b)],
    }
    blobs.append(b)
    offset += len(b)
  h = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


# ----------------------------------------------------------------------------- reading, no torch


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("big_endian", [False, True])
def test_hand_made_torch_checkpoints(tmp_path, legacy, big_endian):
  storages, tensors, expected = _hand_example()
  path = tmp_path / "w.pth"
  _hand_checkpoint(path, tensors, storages, legacy=legacy, big_endian=big_endian)
  got = read_state_dict(path)
  _assert_same_dict(got, expected)
  assert all(a.flags.c_contiguous and a.dtype.isnative for a in got.values())


@pytest.mark.parametrize("legacy", [False, True])
def test_containers_unwrapped_and_module_prefix_stripped(tmp_path, legacy):
  storages, tensors, expected = _hand_example()
  path = tmp_path / "resnet50_ibn_a.pth.tar"
  _hand_checkpoint(
    path, {"module." + k: v for k, v in tensors.items()}, storages, legacy=legacy, wrap="state_dict"
  )
  _assert_same_dict(read_state_dict(path), expected)
  _hand_checkpoint(path, tensors, storages, legacy=legacy, wrap="model")
  _assert_same_dict(read_state_dict(path), expected)


class _Evil:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("layout", ["zip", "legacy", "plain"])
def test_malicious_pickle_refused_without_running(tmp_path, layout):
  side_effect = tmp_path / "pwned"
  payload = pickle.dumps({"conv1.weight": _Evil(side_effect)}, protocol=2)
  path = tmp_path / "evil.pth"
  if layout == "zip":
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", payload)
  elif layout == "legacy":
    with open(path, "wb") as f:
      for head in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        f.write(pickle.dumps(head, protocol=2))
      f.write(payload)
  else:
    path.write_bytes(payload)
  with pytest.raises(UnsafeCheckpointError, match=r"(posix|os|nt)\.system") as info:
    read_state_dict(path)
  assert str(path) in str(info.value)
  assert not side_effect.exists()


def test_other_globals_and_persistent_ids_refused(tmp_path):
  path = tmp_path / "x.pth"
  path.write_bytes(b"\x80\x02" + _p_global("builtins", "eval") + _p_tuple([_p_str("1+1")]) + b"R.")
  with pytest.raises(UnsafeCheckpointError, match="builtins.eval"):
    read_state_dict(path)
  with zipfile.ZipFile(path, "w") as z:  # a pickled module (source), not a state dict
    z.writestr("archive/data.pkl", b"\x80\x02" + _p_tuple([_p_str("module")]) + b"Q.")
  with pytest.raises(UnsafeCheckpointError, match="module"):
    read_state_dict(path)


def test_out_of_bounds_tensor_geometry_rejected(tmp_path):
  storages = {"0": np.arange(6, dtype=np.float32)}
  path = tmp_path / "bad.pth"
  _hand_checkpoint(path, {"w": ("0", 2, (2, 3), (3, 1))}, storages, legacy=False)
  with pytest.raises(WeightsFormatError, match="past its storage"):
    read_state_dict(path)
  _hand_checkpoint(path, {"w": ("0", 0, (2**20, 2**20), (0, 0))}, storages, legacy=True)
  with pytest.raises(
    WeightsFormatError, match=r"tensor 'w' \(size \(1048576, 1048576\).*over the limit"
  ):
    read_state_dict(path)


def _zip_with_zero_storage(path, numel, tensor_size=None, tensor_stride=None):
  """A torch.save-layout zip whose storage ``data/0`` is ``numel`` float32 zeros, stored
  deflated (a few hundred KB for 64 MiB of zeros), viewed by tensor ``w``."""
  size = (numel,) if tensor_size is None else tensor_size
  stride = (1,) if tensor_stride is None else tensor_stride
  pkl = (
    b"\x80\x02"
    + _p_dict([(_p_str("w"), _p_tensor("0", "FloatStorage", numel, 0, size, stride, False))])
    + b"."
  )
  chunk = bytes(1 << 20)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/byteorder", "little")
    info = zipfile.ZipInfo("archive/data/0")
    info.compress_type = zipfile.ZIP_DEFLATED
    with z.open(info, "w") as member:
      left = numel * 4
      while left:
        member.write(chunk[: min(left, len(chunk))])
        left -= min(left, len(chunk))


def _opened_members(monkeypatch):
  """Records the name of every zip member opened from now on."""
  opened = []
  original = zipfile.ZipFile.open

  def spy(self, name, *args, **kwargs):
    opened.append(name.filename if isinstance(name, zipfile.ZipInfo) else name)
    return original(self, name, *args, **kwargs)

  monkeypatch.setattr(zipfile.ZipFile, "open", spy)
  return opened


def test_decompression_bomb_refused_before_its_member_is_read(tmp_path, monkeypatch):
  path = tmp_path / "bomb.pth"
  _zip_with_zero_storage(path, 16 << 20)  # 64 MiB of float32 zeros in a ~70 KB file
  assert os.path.getsize(path) < 1 << 20
  opened = _opened_members(monkeypatch)
  with pytest.raises(WeightsFormatError) as info:
    read_state_dict(path, max_bytes=8 << 20)
  message = str(info.value)
  assert str(path) in message and "'w'" in message and "data/0" in message
  assert "67.1 MB" in message and "limit of 8.4 MB" in message
  assert not [name for name in opened if name.endswith("data/0")]  # never decompressed


def test_declared_size_beyond_storage_or_limit_refused_before_allocating(tmp_path, monkeypatch):
  # 1 GiB described by a stride-0 view of a one-value storage: over the default limit
  # (16 bytes per value of a ResNet-101 with its ImageNet classifier, 715 MB).
  path = tmp_path / "expanded.pth"
  storages = {"0": np.zeros(1, np.float32)}
  _hand_checkpoint(path, {"w": ("0", 0, (1 << 28,), (0,))}, storages, legacy=False)
  with pytest.raises(WeightsFormatError) as info:
    read_state_dict(path)
  message = str(info.value)
  assert str(path) in message and "'w'" in message
  assert "(268435456,)" in message and "1073.7 MB" in message and "limit of 714.6 MB" in message
  # A storage that declares more values than its zip member holds: refused before reading.
  _zip_with_zero_storage(path, 4)
  with zipfile.ZipFile(path) as z:
    members = {n: z.read(n) for n in z.namelist()}
  members["archive/data.pkl"] = members["archive/data.pkl"].replace(
    _p_int(4), _p_int(1 << 28), 2
  )  # numel and size of the one tensor
  with zipfile.ZipFile(path, "w") as z:
    for name, data in members.items():
      z.writestr(name, data)
  opened = _opened_members(monkeypatch)
  with pytest.raises(WeightsFormatError) as info:
    read_state_dict(path)
  message = str(info.value)
  assert "'w'" in message and "data/0" in message and "16 bytes" in message
  assert "268435456 float32 values" in message
  assert not [name for name in opened if name.endswith("data/0")]


def test_load_pretrained_limits_the_file_to_what_the_model_needs(tmp_path):
  """A classifier far larger than the 10-layer model could come with is refused by
  load_pretrained before it is allocated (read_state_dict alone, at its default limit for
  any backbone, would read it)."""
  sd = _numpy_state_dict(10, 8)
  del sd["fc.weight"]
  storages, tensors = {}, {}
  for i, (name, array) in enumerate(sd.items()):
    strides = tuple(s // array.itemsize for s in array.strides)
    storages[str(i)] = array.reshape(-1)
    tensors[name] = (str(i), 0, array.shape, strides)
  storages["fc"] = np.zeros(1, np.float32)
  tensors["fc.weight"] = ("fc", 0, (8192, 2048), (0, 0))  # 67 MB as float32
  path = tmp_path / "r10_big_head.pth"
  _hand_checkpoint(path, tensors, storages, legacy=True)
  variables = _init_like(ReIDResNet(depth=10, width=8))
  with pytest.raises(WeightsFormatError) as info:
    load_pretrained(path, variables, depth=10)
  message = str(info.value)
  assert str(path) in message and "'fc.weight'" in message and "(8192, 2048)" in message


def test_npz_member_declaring_more_than_it_holds_refused(tmp_path):
  path = tmp_path / "w.npz"
  np.savez_compressed(path, big=np.zeros(4 << 20, np.float32), small=np.ones(3, np.float32))
  with pytest.raises(WeightsFormatError) as info:
    read_state_dict(path, max_bytes=1 << 20)
  assert "'big'" in str(info.value) and "limit of 1.0 MB" in str(info.value)
  with zipfile.ZipFile(path) as z:
    header = z.read("small.npy")
  with zipfile.ZipFile(path, "w") as z:  # the header of 3 values, the data of 1
    z.writestr("small.npy", header[:-8])
  with pytest.raises(WeightsFormatError, match=r"'small'.*\(3,\).*4 bytes"):
    read_state_dict(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_and_garbage_files(tmp_path, legacy):
  storages, tensors, _ = _hand_example()
  good = tmp_path / "good.pth"
  _hand_checkpoint(good, tensors, storages, legacy=legacy)
  raw = good.read_bytes()
  for cut in (len(raw) - 7, len(raw) // 2, 20):
    bad = tmp_path / f"cut{cut}.pth"
    bad.write_bytes(raw[:cut])
    with pytest.raises(WeightsFormatError) as info:
      read_state_dict(bad)
    assert str(bad) in str(info.value)
  junk = tmp_path / "junk.bin"
  junk.write_bytes(b"not a checkpoint at all")
  with pytest.raises(WeightsFormatError, match="junk.bin"):
    read_state_dict(junk)
  with pytest.raises(WeightsFormatError, match="missing.pth"):
    read_state_dict(tmp_path / "missing.pth")


def test_safetensors_and_npz(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {
    "conv1.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
    "bn1.running_var": rng.uniform(size=4).astype(np.float16),
    "bn1.num_batches_tracked": np.array(3, np.int64),
  }
  st = tmp_path / "w.safetensors"
  _write_safetensors(st, arrays)
  _assert_same_dict(read_state_dict(st), arrays)
  st.write_bytes(st.read_bytes()[:-5])
  with pytest.raises(WeightsFormatError, match="w.safetensors"):
    read_state_dict(st)
  npz = tmp_path / "w.npz"
  np.savez(npz, **arrays)
  _assert_same_dict(read_state_dict(npz), arrays)


# ----------------------------------------------------------------------------- mapping / loading


def test_torchvision_to_flax_layout():
  sd = _numpy_state_dict(18, 8)
  out = torchvision_to_flax(sd, depth=18)
  np.testing.assert_array_equal(
    out["params"]["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    out["params"]["layer2_0"]["downsample_conv"]["kernel"],
    sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    out["params"]["layer3_1"]["bn2"]["scale"], sd["layer3.1.bn2.weight"]
  )
  np.testing.assert_array_equal(
    out["batch_stats"]["layer4_0"]["downsample_bn"]["var"], sd["layer4.0.downsample.1.running_var"]
  )
  np.testing.assert_array_equal(out["batch_stats"]["bn1"]["mean"], sd["bn1.running_mean"])
  assert "layer1_0" in out["params"] and "downsample_conv" not in out["params"]["layer1_0"]
  assert "fc" not in out["params"]
  with pytest.raises(WeightsMismatchError, match="conv3"):
    torchvision_to_flax(sd, depth=50)


def test_load_pretrained_places_every_tensor(tmp_path):
  model = ReIDResNet(depth=10, width=8)
  variables = _init_like(model)
  sd = _numpy_state_dict(10, 8, seed=1)
  path = tmp_path / "r10.npz"
  np.savez(path, **sd)
  loaded = load_pretrained(path, variables, depth=10)
  flat = weights.flatten_variables(loaded)
  names = weights.trunk_names(10)
  for torch_name, flax_path in names.items():
    np.testing.assert_array_equal(
      np.asarray(flat[flax_path]), weights._to_flax_layout(torch_name, sd[torch_name])
    )
    assert flat[flax_path].dtype == jnp.float32
  # The neck is as initialised; the input variables are not modified.
  assert float(loaded["params"]["gem"]["p"][0]) == 3.0
  np.testing.assert_array_equal(
    loaded["params"]["feat_bn"]["scale"], variables["params"]["feat_bn"]["scale"]
  )
  assert not np.array_equal(
    variables["params"]["conv1"]["kernel"], loaded["params"]["conv1"]["kernel"]
  )
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)


def test_load_pretrained_lists_every_problem(tmp_path):
  model = ReIDResNet(depth=10, width=8)
  variables = _init_like(model)
  sd = _numpy_state_dict(10, 8)
  del sd["layer2.0.conv1.weight"], sd["layer3.0.bn2.running_var"]
  sd["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  sd["head.bias"] = np.zeros(3, np.float32)
  sd["layer1.0.conv2.weight"] = np.zeros((8, 8, 1, 1), np.float32)
  sd["bn1.weight"] = np.zeros(9, np.float32)
  path = tmp_path / "bad.npz"
  np.savez(path, **sd)
  with pytest.raises(WeightsMismatchError) as info:
    load_pretrained(path, variables, depth=10)
  msg = str(info.value)
  for text in (
    "layer2.0.conv1.weight",
    "layer3.0.bn2.running_var",
    "layer5.0.conv1.weight",
    "head.bias",
    "layer1.0.conv2.weight: file (8, 8, 1, 1), model (8, 8, 3, 3)",
    "bn1.weight: file (9,), model (8,)",
    str(path),
  ):
    assert text in msg, text
  assert "fc.weight" not in msg and "num_batches_tracked" not in msg
  # Wrong IBN flag: the IBN keys are missing and the plain bn1 keys unexpected.
  np.savez(path, **_numpy_state_dict(10, 8))
  with pytest.raises(WeightsMismatchError, match=r"layer1\.0\.bn1\.IN\.weight"):
    load_pretrained(path, _init_like(ReIDResNet(depth=10, width=8, ibn=True)), depth=10, ibn=True)


def test_convert_cli_round_trip(tmp_path, capsys):
  model = ReIDResNet(depth=10, width=8, ibn=True)
  variables = _init_like(model)
  sd = _numpy_state_dict(10, 8, ibn=True, seed=3)
  src = tmp_path / "src.safetensors"
  _write_safetensors(src, sd)
  out = tmp_path / "converted.weights"  # no .npz suffix: written under exactly this name
  assert convert_weights.main([str(src), str(out), "--depth", "10", "--ibn"]) == 0
  printed = capsys.readouterr().out
  n_tensors = len(weights.trunk_names(10, True))
  n_params = sum(
    sd[k].size for k, p in weights.trunk_names(10, True).items() if p.startswith("params/")
  )
  assert f"{n_tensors} tensors" in printed and f"{n_params:,} parameters" in printed
  assert out.exists()
  assert all(k.startswith(("params/", "batch_stats/")) for k in np.load(out).files)
  direct = load_pretrained(src, variables, depth=10, ibn=True)
  via_cli = load_pretrained(out, variables, depth=10, ibn=True)
  jax.tree.map(np.testing.assert_array_equal, direct, via_cli)
  # A mismatching depth is an error with exit status 1.
  assert convert_weights.main([str(src), str(tmp_path / "x.npz"), "--depth", "18"]) == 1
  assert "missing" in capsys.readouterr().err


def test_convert_cli_module_entry_point(tmp_path):
  src = tmp_path / "r10.npz"
  np.savez(src, **_numpy_state_dict(10, 8))
  out = tmp_path / "out.npz"
  result = subprocess.run(
    [sys.executable, "-m", "ccreid_jax.tools.convert_weights", str(src), str(out), "--depth", "10"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr
  assert "tensors" in result.stdout and out.exists()


# ----------------------------------------------------------------------------- torch parity

_DEPTHS = {
  10: ("basic", (1, 1, 1, 1)),
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
}


def torch_resnet(torch, depth, width=64, ibn=False, last_stride=2, num_classes=1000):
  """torchvision's ResNet (v1.5) with its exact module names; ``ibn`` gives IBN-Net's
  ResNet-IBN-a (bn1 of layer1-3 blocks = IBN with ``IN`` and ``BN``)."""
  tnn = torch.nn
  kind, layers = _DEPTHS[depth]
  expansion = 4 if kind == "bottleneck" else 1

  class IBN(tnn.Module):
    def __init__(self, planes):
      super().__init__()
      self.half = int(planes * 0.5)
      self.IN = tnn.InstanceNorm2d(self.half, affine=True)
      self.BN = tnn.BatchNorm2d(planes - self.half)

    def forward(self, x):
      first, rest = torch.split(x, self.half, 1)
      return torch.cat((self.IN(first.contiguous()), self.BN(rest.contiguous())), 1)

  class Block(tnn.Module):
    def __init__(self, inplanes, planes, stride, downsample, use_ibn):
      super().__init__()
      if kind == "basic":
        self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = IBN(planes) if use_ibn else tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
      else:
        self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = IBN(planes) if use_ibn else tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
      self.relu = tnn.ReLU()
      self.downsample = downsample

    def forward(self, x):
      y = self.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      if kind == "bottleneck":
        y = self.bn3(self.conv3(self.relu(y)))
      return self.relu(y + (x if self.downsample is None else self.downsample(x)))

  class ResNet(tnn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
      self.bn1 = tnn.BatchNorm2d(width)
      self.relu = tnn.ReLU()
      self.maxpool = tnn.MaxPool2d(3, 2, 1)
      inplanes = width
      for stage, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, last_stride))):
        planes = width * 2**stage
        seq = []
        for index in range(blocks):
          s = stride if index == 0 else 1
          down = None
          if index == 0 and (s != 1 or inplanes != planes * expansion):
            down = tnn.Sequential(
              tnn.Conv2d(inplanes, planes * expansion, 1, s, bias=False),
              tnn.BatchNorm2d(planes * expansion),
            )
          seq.append(Block(inplanes, planes, s, down, ibn and stage < 3))
          inplanes = planes * expansion
        setattr(self, f"layer{stage + 1}", tnn.Sequential(*seq))
      self.avgpool = tnn.AdaptiveAvgPool2d(1)
      self.fc = tnn.Linear(inplanes, num_classes)

    def trunk(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      return self.layer4(self.layer3(self.layer2(self.layer1(x))))

  return ResNet()


def _randomise(torch, net, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in net.state_dict().items():
      if name.endswith("num_batches_tracked"):
        t.fill_(5)
      elif t.ndim == 4:
        fan_out = t.shape[0] * t.shape[2] * t.shape[3]
        t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / fan_out) ** 0.5)
      elif name.endswith(("running_var", ".weight")):
        t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
      else:
        t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
  return net.eval()


def test_torch_reference_model_matches_torchvision_and_flax_shapes():
  torch = pytest.importorskip("torch")
  with torch.device("meta"):
    r50 = torch_resnet(torch, 50)
    r18 = torch_resnet(torch, 18)
    r50_ibn = torch_resnet(torch, 50, ibn=True)
  # torchvision's published parameter counts (fc included).
  assert sum(p.numel() for p in r50.parameters()) == 25_557_032
  assert sum(p.numel() for p in r18.parameters()) == 11_689_512
  for depth, ibn, net in ((50, False, r50), (18, False, r18), (50, True, r50_ibn)):
    flat = weights.flatten_variables(_abstract(ReIDResNet(depth=depth, ibn=ibn)))
    names = weights.trunk_names(depth, ibn)
    sd = {k: v for k, v in net.state_dict().items() if not weights._is_ignored(k)}
    assert sorted(sd) == sorted(names)
    for k, v in sd.items():
      assert weights._to_torch_shape(names[k], flat[names[k]].shape) == tuple(v.shape), k


@pytest.fixture(scope="module")
def torch_r18(tmp_path_factory):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  net = _randomise(torch, torch_resnet(torch, 18, width=64, last_stride=1))
  folder = tmp_path_factory.mktemp("r18")
  zip_path, legacy_path = folder / "resnet18.pth", folder / "resnet18_legacy.pth"
  torch.save(net.state_dict(), zip_path)
  torch.save(
    {
      "state_dict": {"module." + k: v for k, v in net.state_dict().items()},
      "epoch": 90,
      "arch": "resnet18",
    },
    legacy_path,
    _use_new_zipfile_serialization=False,
  )
  return torch, net, zip_path, legacy_path


def test_torch_saved_state_dicts_read_identically(torch_r18):
  _, net, zip_path, legacy_path = torch_r18
  expected = {k: v.numpy() for k, v in net.state_dict().items()}
  _assert_same_dict(read_state_dict(zip_path), expected)
  _assert_same_dict(read_state_dict(legacy_path), expected)


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_views_dtypes_and_parameters_round_trip(tmp_path, legacy):
  torch = pytest.importorskip("torch")
  gen = torch.Generator().manual_seed(0)
  base = torch.randn(6, 8, generator=gen)
  obj = {
    "transposed": base.t(),
    "sliced": base[1:, ::3],
    "expanded": torch.randn(3, 1, generator=gen).expand(3, 4),
    "half": torch.randn(5, generator=gen).half(),
    "bf16": torch.randn(5, generator=gen).bfloat16(),
    "double": torch.randn(2, 2, generator=gen).double(),
    "param": torch.nn.Parameter(torch.randn(4, generator=gen)),
    "count": torch.tensor(12),
    "flags": torch.tensor([True, False]),
    "empty": torch.zeros(0, 3),
  }
  path = tmp_path / "views.pth"
  torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
  got = read_state_dict(path)
  for k, v in obj.items():
    ref = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
    out = got[k].astype(np.float32) if v.dtype == torch.bfloat16 else got[k]
    assert out.dtype == ref.dtype and out.shape == ref.shape, k
    np.testing.assert_array_equal(out, ref, err_msg=k)


def _feature_maps_match(torch, net, flax_model, variables, seed=0, h=64, w=32):
  x = np.random.default_rng(seed).normal(size=(2, 3, h, w)).astype(np.float32)
  with torch.no_grad():
    ref = net.trunk(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  out = flax_model.apply(
    variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=False, return_feature_map=True
  )
  assert out.shape == ref.shape
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)


def test_load_pretrained_forward_matches_torch_resnet18(torch_r18):
  torch, net, zip_path, legacy_path = torch_r18
  model = ReIDResNet(depth=18, width=64, last_stride=1)
  variables = _init_like(model)
  loaded = load_pretrained(zip_path, variables, depth=18)
  sd = net.state_dict()
  np.testing.assert_array_equal(
    loaded["params"]["layer3_1"]["conv2"]["kernel"],
    sd["layer3.1.conv2.weight"].numpy().transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    loaded["batch_stats"]["layer2_0"]["downsample_bn"]["mean"],
    sd["layer2.0.downsample.1.running_mean"].numpy(),
  )
  jax.tree.map(
    np.testing.assert_array_equal, loaded, load_pretrained(legacy_path, variables, depth=18)
  )
  _feature_maps_match(torch, net, model, loaded)


def test_load_pretrained_forward_matches_torch_resnet50_ibn_a(tmp_path):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  net = _randomise(torch, torch_resnet(torch, 50, width=8, ibn=True, last_stride=1), seed=1)
  path = tmp_path / "resnet50_ibn_a.pth.tar"
  torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, path)
  model = ReIDResNet(depth=50, width=8, ibn=True)
  # IBN-Net's parameter count without fc equals ours without the neck.
  n_torch = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("fc."))
  flat = weights.flatten_variables(_init_like(model)["params"])
  assert n_torch == sum(
    v.size for k, v in flat.items() if k.split("/")[0] not in weights.NECK_MODULES
  )
  loaded = load_pretrained(path, _init_like(model), depth=50, ibn=True)
  np.testing.assert_array_equal(
    loaded["params"]["layer2_3"]["bn1"]["IN"]["bias"],
    net.state_dict()["layer2.3.bn1.IN.bias"].numpy(),
  )
  _feature_maps_match(torch, net, model, loaded)


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_saved_module_refused(tmp_path, legacy):
  torch = pytest.importorskip("torch")
  path = tmp_path / "whole_model.pth"
  torch.save(torch.nn.Linear(2, 2), path, _use_new_zipfile_serialization=not legacy)
  with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules\.linear\.Linear"):
    read_state_dict(path)
