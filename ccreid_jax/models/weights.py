"""Pretrained backbone weights: safe checkpoint reading and torchvision -> Flax mapping.

``read_state_dict`` reads PyTorch checkpoints (``torch.save`` zip archives and the older
non-zip "legacy" stream), ``.safetensors`` and ``.npz`` files into ``{name: np.ndarray}``
without importing torch. PyTorch checkpoints are pickles; a pickle can call any importable
function, so the unpickler here resolves only the few globals a tensor state dict is built
from, each mapped to a local numpy function. Anything else raises ``UnsafeCheckpointError``
before it is called.

``torchvision_to_flax`` maps a torchvision ResNet (or IBN-Net ResNet-IBN-a) state dict onto
the trunk of ``ReIDResNet``; ``load_pretrained`` puts a file's trunk into a model's
initialised variables, leaving the GeM and BN neck as initialised (the reference builds them
fresh too). Files written by ``python -m ccreid_jax.tools.convert_weights`` (``.npz`` keyed
by flattened Flax paths such as ``params/layer1_0/conv1/kernel``) load directly.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ccreid_jax.models.resnet import BLOCK_EXPANSION, block_layout

__all__ = [
  "BYTES_PER_MODEL_VALUE",
  "DEFAULT_MAX_BYTES",
  "UnsafeCheckpointError",
  "WeightsFormatError",
  "WeightsMismatchError",
  "WeightsTooLargeError",
  "apply_state_dict",
  "flatten_variables",
  "is_flax_state_dict",
  "load_pretrained",
  "max_weights_bytes",
  "read_state_dict",
  "torchvision_to_flax",
  "trunk_names",
  "unflatten_variables",
]

# Keys of the Flax model that a backbone file does not provide (built fresh, as in the
# reference).
NECK_MODULES = ("gem", "feat_bn")


class WeightsFormatError(ValueError):
  """A weights file that cannot be read: corrupt, truncated or of an unknown layout."""


class UnsafeCheckpointError(WeightsFormatError):
  """A pickle that asks for a global outside the tensor-state-dict allow-list."""


class WeightsTooLargeError(WeightsFormatError):
  """A file declaring more data than a weights file for the model can hold (refused before
  that data is read or allocated)."""


class WeightsMismatchError(ValueError):
  """A file whose tensors do not fit the model: missing, unexpected or misshapen keys."""


# ----------------------------------------------------------------------------- torch pickles

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# How much data a weights file may declare. A file is refused, before anything large is
# read or allocated, when its tensors (or its storages) total more than
# BYTES_PER_MODEL_VALUE bytes per value of the model it is for plus an ImageNet classifier:
# room for float64 weights with one more copy (optimizer state), or four float32 copies.
BYTES_PER_MODEL_VALUE = 16
_CLASSIFIER_VALUES = 2048 * 1000 + 1000  # fc of a 2048-channel ImageNet ResNet.
_LARGEST_MODEL_VALUES = 42_611_649  # ReIDResNet(depth=101): the largest backbone.
# The pickle of a state dict holds names and sizes only (~100 KB for a ResNet-101).
_MAX_PICKLE_BYTES = 64 << 20


def max_weights_bytes(model_values: int = _LARGEST_MODEL_VALUES) -> int:
  """The most data (bytes) a weights file for a model of ``model_values`` values may hold.

  The default is for the largest backbone (ResNet-101): 714.6 MB.
  """
  return BYTES_PER_MODEL_VALUE * (int(model_values) + _CLASSIFIER_VALUES)


DEFAULT_MAX_BYTES = max_weights_bytes()


def _mb(nbytes: int) -> str:
  return f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes:,} bytes"


def _limit_text(max_bytes: int) -> str:
  return (
    f"the limit of {_mb(max_bytes)} ({BYTES_PER_MODEL_VALUE} bytes per value of the "
    "model plus an ImageNet classifier)"
  )


_STORAGE_DTYPES = {
  "DoubleStorage": np.dtype(np.float64),
  "FloatStorage": np.dtype(np.float32),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
  "UntypedStorage": np.dtype(np.uint8),
}

_TORCH_DTYPES = {
  "float64": np.float64,
  "double": np.float64,
  "float32": np.float32,
  "float": np.float32,
  "float16": np.float16,
  "half": np.float16,
  "bfloat16": ml_dtypes.bfloat16,
  "int64": np.int64,
  "long": np.int64,
  "int32": np.int32,
  "int": np.int32,
  "int16": np.int16,
  "short": np.int16,
  "int8": np.int8,
  "uint8": np.uint8,
  "bool": np.bool_,
}


class _StorageType:
  """Stands in for ``torch.FloatStorage`` & co. inside a persistent id."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _TorchDtype:
  """Stands in for ``torch.float32`` & co. (an argument of ``_rebuild_tensor_v3``)."""

  def __init__(self, name: str):
    self.dtype = np.dtype(_TORCH_DTYPES[name])


class _TensorType:
  """Stands in for ``torch.Tensor`` / ``torch.nn.Parameter`` in ``_rebuild_from_type_v2``."""

  def __init__(self, name: str):
    self.name = name


class _Storage:
  """One serialised storage: its element type, byte buffer (filled once read) and key."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key = key
    self.dtype = dtype
    self.numel = numel
    self.data: np.ndarray | None = None  # 1-D, self.dtype (possibly non-native order)
    self.base: _Storage | None = None  # legacy storage views: (root storage, offset)
    self.offset = 0
    self.member: zipfile.ZipInfo | None = None  # zip archives: read once checked

  @property
  def nbytes(self) -> int:
    return self.numel * self.dtype.itemsize

  def describe(self) -> str:
    return f"storage data/{self.key} ({self.numel} {self.dtype.name} values, {_mb(self.nbytes)})"

  def array(self) -> np.ndarray:
    if self.base is not None:
      root = self.base.array()
      return root.view(np.uint8)[self.offset : self.offset + self.numel * self.dtype.itemsize].view(
        self.dtype
      )
    if self.data is None:
      raise WeightsFormatError(f"storage {self.key!r} is referenced but never written")
    return self.data


class _PendingTensor:
  """A tensor whose storage bytes may not have been read yet (the legacy format writes
  them after the pickle)."""

  def __init__(self, storage, offset, size, stride, dtype=None):
    if not isinstance(storage, _Storage):
      raise WeightsFormatError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    self.storage = storage
    self.offset = offset
    self.size = size
    self.stride = stride
    self.dtype = dtype

  @property
  def element_dtype(self) -> np.dtype:
    return self.storage.dtype if self.dtype is None else self.dtype

  def nbytes(self) -> int:
    """Bytes of the array this tensor becomes (geometry checked by ``check``)."""
    return int(np.prod(self.size, dtype=object)) * self.element_dtype.itemsize

  def check(self, name: str, source: str) -> None:
    """Refuses a geometry that is malformed or reaches outside the storage's data."""
    size, stride, offset = self.size, self.stride, self.offset
    if not (
      isinstance(offset, int)
      and offset >= 0
      and len(size) == len(stride)
      and all(isinstance(v, int) and v >= 0 for v in (*size, *stride))
    ):
      raise WeightsFormatError(
        f"{source}: tensor {name!r} has a bad geometry: offset {offset!r}, size {size!r}, "
        f"stride {stride!r}"
      )
    if 0 in size:
      return
    available = self.storage.nbytes // self.element_dtype.itemsize
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= available:
      raise WeightsFormatError(
        f"{source}: tensor {name!r} of size {tuple(size)}, stride {tuple(stride)}, offset "
        f"{offset} reads element {last}, past its {self.storage.describe()}"
      )

  def materialise(self) -> np.ndarray:
    data = self.storage.array()
    if self.dtype is not None and self.dtype != data.dtype.newbyteorder("="):
      order = data.dtype.byteorder
      data = data.view(np.uint8).view(self.dtype.newbyteorder(order if order in "<>" else "="))
    size, stride, offset = self.size, self.stride, self.offset
    if 0 in size:
      out = np.empty(size, data.dtype)
    else:
      last = offset + sum((n - 1) * s for n, s in zip(size, stride))
      if last >= data.size:  # checked before reading; kept as the guard of as_strided
        raise WeightsFormatError(
          f"tensor of size {tuple(size)}, stride {tuple(stride)}, offset {offset} reads "
          f"past its storage of {data.size} elements"
        )
      view = np.lib.stride_tricks.as_strided(
        data[offset:],
        shape=tuple(size),
        strides=tuple(s * data.itemsize for s in stride),
        writeable=False,
      )
      out = np.array(view, order="C")
    return out.astype(out.dtype.newbyteorder("="), copy=False)


def _rebuild_tensor_v2(
  storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
  del requires_grad, backward_hooks, metadata
  return _PendingTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor_v3(
  storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, _TorchDtype):
    raise WeightsFormatError(f"_rebuild_tensor_v3 with dtype {dtype!r}")
  return _PendingTensor(storage, storage_offset, tuple(size), tuple(stride), dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del state
  if not isinstance(new_type, _TensorType) or func not in (
    _rebuild_tensor_v2,
    _rebuild_tensor_v3,
    _rebuild_parameter,
  ):
    raise WeightsFormatError("_rebuild_from_type_v2 with an unsupported type or function")
  return func(*args)


def _torch_size(values=()):
  return tuple(values)


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
    raise WeightsFormatError("numpy scalar of an unsupported type")
  return np.frombuffer(data, dtype, count=1)[0]


def _allowed_global(module: str, name: str):
  """The local stand-in for a pickled global, or None when the global is not allowed."""
  if module == "collections" and name == "OrderedDict":
    return collections.OrderedDict
  if module == "torch._utils":
    return {
      "_rebuild_tensor_v2": _rebuild_tensor_v2,
      "_rebuild_tensor_v3": _rebuild_tensor_v3,
      "_rebuild_parameter": _rebuild_parameter,
      "_rebuild_parameter_with_state": _rebuild_parameter,
    }.get(name)
  if module == "torch._tensor" and name == "_rebuild_from_type_v2":
    return _rebuild_from_type_v2
  if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
    return _StorageType(name)
  if module == "torch" and name in _TORCH_DTYPES:
    return _TorchDtype(name)
  if (module, name) in (
    ("torch", "Tensor"),
    ("torch._tensor", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("torch.nn", "Parameter"),
  ):
    return _TensorType(name)
  if module == "torch" and name == "Size":
    return _torch_size
  if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
    return _numpy_scalar
  if module == "numpy" and name == "dtype":
    return np.dtype
  return None


class _RestrictedUnpickler(pickle.Unpickler):
  """Builds only state-dict objects; storages come from ``resolve_storage``."""

  def __init__(self, file, source: str, resolve_storage=None):
    super().__init__(file)
    self._source = source
    self._resolve_storage = resolve_storage

  def find_class(self, module, name):
    found = _allowed_global(module, name)
    if found is None:
      raise UnsafeCheckpointError(
        f"{self._source}: refusing to load the pickled global {module}.{name}; only "
        "tensor state dicts can be read (save model.state_dict() instead)"
      )
    return found

  def persistent_load(self, pid):
    if self._resolve_storage is None:
      raise UnsafeCheckpointError(f"{self._source}: unexpected persistent id in a plain pickle")
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      kind = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
      raise UnsafeCheckpointError(
        f"{self._source}: refusing persistent object {kind!r} (only tensor storages)"
      )
    return self._resolve_storage(pid)


def _storage_fields(pid, source):
  if len(pid) < 5 or not isinstance(pid[1], _StorageType) or not isinstance(pid[4], int):
    raise WeightsFormatError(f"{source}: malformed storage reference {pid[:5]!r}")
  return pid[1], str(pid[2]), pid[4]


def _materialise(obj, memo: dict[int, Any] | None = None):
  """Replaces every pending tensor in nested dicts / lists / tuples by its numpy array.

  A container or tensor referenced several times (pickle memo) is converted once.
  """
  memo = {} if memo is None else memo
  if id(obj) in memo:
    return memo[id(obj)]
  out: Any
  if isinstance(obj, _PendingTensor):
    out = obj.materialise()
  elif isinstance(obj, dict):
    out = {k: _materialise(v, memo) for k, v in obj.items()}
  elif isinstance(obj, (list, tuple)):
    out = type(obj)(_materialise(v, memo) for v in obj)
  else:
    return obj
  memo[id(obj)] = out
  return out


def _named_tensors(obj) -> list[tuple[str, _PendingTensor]]:
  """``(path, tensor)`` of every pending tensor in nested dicts / lists / tuples, in order;
  a path joins keys with ``/`` (``state_dict/conv1.weight``). Each object is visited once."""
  found, seen = [], set()
  stack = [("", obj)]
  while stack:
    path, node = stack.pop()
    if not isinstance(node, (_PendingTensor, dict, list, tuple)) or id(node) in seen:
      continue
    seen.add(id(node))
    if isinstance(node, _PendingTensor):
      found.append((path or "<top level>", node))
      continue
    items = node.items() if isinstance(node, dict) else enumerate(node)
    children = [(f"{path}/{k}" if path else str(k), v) for k, v in items]
    stack.extend(reversed(children))
  return found


def _check_sizes(named: list[tuple[str, _PendingTensor]], source: str, max_bytes: int) -> None:
  """Refuses, before any storage is read or tensor allocated: a storage that declares more
  data than its zip member holds, a legacy storage view outside its storage, a tensor
  reaching outside its storage, and storages or tensors totalling more than ``max_bytes``."""
  storage_total = tensor_total = 0
  counted: set[int] = set()
  for name, tensor in named:
    storage = tensor.storage
    root = storage.base if storage.base is not None else storage
    if storage.base is not None and storage.offset + storage.nbytes > root.nbytes:
      raise WeightsFormatError(
        f"{source}: tensor {name!r} uses a view of {root.describe()} that reaches past "
        f"its end (byte {storage.offset + storage.nbytes})"
      )
    if id(root) not in counted:
      counted.add(id(root))
      member = root.member
      if member is not None and member.file_size < root.nbytes:
        raise WeightsFormatError(
          f"{source}: storage data/{root.key} of tensor {name!r} declares {root.numel} "
          f"{root.dtype.name} values ({_mb(root.nbytes)}) but its zip member "
          f"{member.filename} holds {_mb(member.file_size)} (a truncated or forged file)"
        )
      storage_total += root.nbytes
      if storage_total > max_bytes:
        raise WeightsTooLargeError(
          f"{source}: {root.describe()} of tensor {name!r} brings the file's storages to "
          f"{_mb(storage_total)}, over {_limit_text(max_bytes)}; refusing to read it. Is "
          "this the weights file of the model?"
        )
    tensor.check(name, source)
    nbytes = tensor.nbytes()
    tensor_total += nbytes
    if tensor_total > max_bytes:
      raise WeightsTooLargeError(
        f"{source}: tensor {name!r} (size {tuple(tensor.size)}, "
        f"{tensor.element_dtype.name}, {_mb(nbytes)}) brings the file's tensors to "
        f"{_mb(tensor_total)}, over {_limit_text(max_bytes)}; refusing to allocate it. Is "
        "this the weights file of the model?"
      )


def _read_member(archive: zipfile.ZipFile, name: str, limit: int, source: str) -> bytes:
  """A small zip member (pickle, byteorder), refused when it declares more than ``limit``."""
  info = archive.getinfo(name)
  if info.file_size > limit:
    raise WeightsTooLargeError(
      f"{source}: zip member {name} declares {_mb(info.file_size)}, more than the "
      f"{_mb(limit)} it can need; refusing to read it"
    )
  with archive.open(info) as f:
    return f.read(limit + 1)


def _read_torch_zip(archive: zipfile.ZipFile, source: str, max_bytes: int):
  pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise WeightsFormatError(f"{source}: zip archive without a single <name>/data.pkl")
  prefix = pickles[0][: -len("data.pkl")]
  order = "<"
  if prefix + "byteorder" in archive.namelist():
    text = _read_member(archive, prefix + "byteorder", 16, source).decode("ascii", "replace")
    text = text.strip()
    if text not in ("little", "big"):
      raise WeightsFormatError(f"{source}: unknown byteorder {text!r}")
    order = "<" if text == "little" else ">"
  storages: dict[tuple[str, np.dtype], _Storage] = {}

  def resolve(pid):
    # Only the member's declared size is looked at here; the data is read once every
    # tensor's size has been checked (_check_sizes).
    storage_type, key, numel = _storage_fields(pid, source)
    dtype = storage_type.dtype.newbyteorder(order)
    if (key, dtype) not in storages:
      try:
        member = archive.getinfo(f"{prefix}data/{key}")
      except KeyError:
        raise WeightsFormatError(f"{source}: storage data/{key} is missing") from None
      if numel < 0:
        raise WeightsFormatError(f"{source}: storage data/{key} declares {numel} values")
      storage = _Storage(key, dtype, numel)
      storage.member = member
      storages[(key, dtype)] = storage
    return storages[(key, dtype)]

  pickled = _read_member(archive, pickles[0], _MAX_PICKLE_BYTES, source)
  obj = _RestrictedUnpickler(io.BytesIO(pickled), source, resolve).load()
  named = _named_tensors(obj)
  _check_sizes(named, source, max_bytes)
  for storage in {id(t.storage): t.storage for _, t in named}.values():
    if storage.data is None:
      assert storage.member is not None  # every storage of a zip archive has its member
      with archive.open(storage.member) as f:  # at most the declared size is decompressed
        raw = f.read(storage.nbytes)
      if len(raw) < storage.nbytes:
        raise WeightsFormatError(
          f"{source}: storage data/{storage.key} holds {len(raw)} bytes, expected {storage.nbytes}"
        )
      storage.data = np.frombuffer(raw, storage.dtype, count=storage.numel)
  return _materialise(obj)


def _read_torch_legacy(stream: io.BytesIO, source: str, max_bytes: int):
  def plain():
    return _RestrictedUnpickler(stream, source).load()

  if plain() != _LEGACY_MAGIC:
    raise WeightsFormatError(f"{source}: not a PyTorch checkpoint (bad magic number)")
  if plain() != _LEGACY_PROTOCOL:
    raise WeightsFormatError(f"{source}: unsupported legacy protocol version")
  sys_info = plain()
  little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
  order = "<" if little else ">"
  storages: dict[str, _Storage] = {}

  def resolve(pid):
    storage_type, key, numel = _storage_fields(pid, source)
    if key not in storages:
      storages[key] = _Storage(key, storage_type.dtype.newbyteorder(order), numel)
    root = storages[key]
    view = pid[5] if len(pid) > 5 else None
    if view is None:
      return root
    view_key, offset, view_size = view
    # Very old torch saved storage views: (view key, element offset, element count).
    if view_key not in storages:
      child = _Storage(str(view_key), root.dtype, int(view_size))
      child.base, child.offset = root, int(offset) * root.dtype.itemsize
      storages[view_key] = child
    return storages[view_key]

  result = _RestrictedUnpickler(stream, source, resolve).load()
  keys = plain()
  if not isinstance(keys, list):
    raise WeightsFormatError(f"{source}: malformed storage key list")
  for key in keys:
    storage = storages.get(str(key))
    if storage is None or storage.base is not None:
      raise WeightsFormatError(f"{source}: storage {key!r} written but never referenced")
    header = stream.read(8)
    if len(header) != 8:
      raise WeightsFormatError(f"{source}: truncated before storage {key!r}")
    (count,) = struct.unpack(order + "q", header)
    nbytes = count * storage.dtype.itemsize
    raw = stream.read(nbytes) if count >= 0 else b""
    if count < 0 or len(raw) != nbytes:
      raise WeightsFormatError(f"{source}: truncated storage {key!r}")
    storage.data = np.frombuffer(raw, storage.dtype)
    storage.numel = count
  # The storages are part of the file (read already); the tensors are checked before the
  # arrays are allocated.
  _check_sizes(_named_tensors(result), source, max_bytes)
  return _materialise(result)


# ----------------------------------------------------------------------------- other formats

_SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U64": np.uint64,
  "U32": np.uint32,
  "U16": np.uint16,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


def _read_safetensors(raw: bytes, source: str) -> dict[str, np.ndarray]:
  if len(raw) < 8:
    raise WeightsFormatError(f"{source}: truncated safetensors header")
  (header_len,) = struct.unpack("<Q", raw[:8])
  if header_len > len(raw) - 8:
    raise WeightsFormatError(f"{source}: safetensors header runs past the end of the file")
  try:
    header = json.loads(raw[8 : 8 + header_len].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WeightsFormatError(f"{source}: unreadable safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise WeightsFormatError(f"{source}: safetensors header is not a JSON object")
  body = memoryview(raw)[8 + header_len :]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
      shape = tuple(int(d) for d in info["shape"])
      begin, end = (int(v) for v in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise WeightsFormatError(f"{source}: bad safetensors entry {name!r} ({e!r})") from None
    count = int(np.prod(shape, dtype=np.int64))
    if not 0 <= begin <= end <= len(body) or end - begin != count * dtype.itemsize:
      raise WeightsFormatError(
        f"{source}: safetensors entry {name!r} has bad data offsets (truncated file?)"
      )
    arr = np.frombuffer(body[begin:end], dtype, count=count).reshape(shape)
    out[name] = arr.astype(dtype.newbyteorder("="))
  return out


def _read_npz(archive: zipfile.ZipFile, source: str, max_bytes: int) -> dict[str, np.ndarray]:
  """The arrays of an ``.npz``, every member's header checked against its size and the
  total against ``max_bytes`` before any array is read."""
  members, total = [], 0
  for info in archive.infolist():
    name = info.filename[: -len(".npy")]
    with archive.open(info) as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        raise WeightsFormatError(f"{source}: array {name!r} is in .npy format {version}")
      held = info.file_size - f.tell()
    if dtype.hasobject:
      raise UnsafeCheckpointError(f"{source}: array {name!r} holds Python objects (a pickle)")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > held:
      raise WeightsFormatError(
        f"{source}: array {name!r} declares shape {tuple(shape)}, {dtype.name} "
        f"({_mb(nbytes)}) but its member {info.filename} holds {_mb(max(held, 0))} of data "
        "(a truncated or forged file)"
      )
    total += nbytes
    if total > max_bytes:
      raise WeightsTooLargeError(
        f"{source}: array {name!r} (shape {tuple(shape)}, {dtype.name}, {_mb(nbytes)}) "
        f"brings the file's arrays to {_mb(total)}, over {_limit_text(max_bytes)}; refusing "
        "to read it. Is this the weights file of the model?"
      )
    members.append((name, info))
  out = {}
  for name, info in members:
    with archive.open(info) as f:
      out[name] = np.lib.format.read_array(f, allow_pickle=False)
  return out


# ----------------------------------------------------------------------------- read_state_dict

_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net")


def _find_state_dict(obj, source: str) -> dict[str, np.ndarray]:
  if isinstance(obj, dict):
    for key in _CONTAINER_KEYS:
      if isinstance(obj.get(key), dict):
        return _find_state_dict(obj[key], source)
    if obj and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
      return dict(obj)
    kinds = {str(k): type(v).__name__ for k, v in list(obj.items())[:10]}
    raise WeightsFormatError(
      f"{source}: no tensor state dict found (top-level entries: {kinds}); expected "
      f"name -> tensor, or a dict holding one under {list(_CONTAINER_KEYS)}"
    )
  raise WeightsFormatError(
    f"{source}: checkpoint holds a {type(obj).__name__}, not a tensor state dict"
  )


def read_state_dict(
  path: str | os.PathLike, *, max_bytes: int | None = None
) -> dict[str, np.ndarray]:
  """Reads ``{name: array}`` from a PyTorch checkpoint, ``.safetensors`` or ``.npz`` file.

  The format is found from the content, not the name: a zip with ``<name>/data.pkl`` is a
  ``torch.save`` archive, a zip of ``.npy`` files is an ``.npz``, a pickle stream is the
  legacy ``torch.save`` format, and anything else is tried as safetensors. Checkpoint
  containers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped and a DataParallel
  ``module.`` prefix is stripped. Arrays come back C-contiguous in native byte order with
  their stored dtype (bfloat16 via ml_dtypes).

  Sizes are checked before data is read or allocated: every tensor's size, stride and
  offset must stay inside its storage, every storage inside its zip member (so a small file
  cannot decompress into gigabytes), and the storages, the tensors and the file itself must
  each total at most ``max_bytes`` (default ``DEFAULT_MAX_BYTES``, 714.6 MB: the largest
  backbone's values at ``BYTES_PER_MODEL_VALUE`` bytes each; ``load_pretrained`` passes the
  limit of its model).

  Raises:
    UnsafeCheckpointError: the pickle asks for anything but a tensor state dict.
    WeightsTooLargeError: the file declares more data than ``max_bytes``, naming the tensor.
    WeightsFormatError: a corrupt, truncated or unrecognised file.
  """
  source = os.fspath(path)
  limit = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
  try:
    size = os.path.getsize(source)
    with open(source, "rb") as f:
      head = f.read(16)
  except OSError as e:
    raise WeightsFormatError(f"{source}: cannot read ({e.strerror})") from None
  if size > limit + _MAX_PICKLE_BYTES:
    raise WeightsTooLargeError(
      f"{source}: the file holds {_mb(size)}, more than {_limit_text(limit)} allows; "
      "refusing to read it. Is this the weights file of the model?"
    )
  try:
    if head[:4] == b"PK\x03\x04" or zipfile.is_zipfile(source):
      with zipfile.ZipFile(source) as archive:
        names = archive.namelist()
        if names and all(n.endswith(".npy") for n in names):
          obj = _read_npz(archive, source, limit)
        else:
          obj = _read_torch_zip(archive, source, limit)
    elif head[:1] == b"\x80":
      with open(source, "rb") as f:
        obj = _read_torch_legacy(io.BytesIO(f.read()), source, limit)
    elif head[8:9] == b"{":
      with open(source, "rb") as f:
        obj = _read_safetensors(f.read(), source)
    else:
      raise WeightsFormatError(
        f"{source}: unrecognised weights format (expected a torch.save checkpoint, "
        ".safetensors or .npz)"
      )
  except WeightsFormatError:
    raise
  except (
    pickle.UnpicklingError,
    EOFError,
    zipfile.BadZipFile,
    struct.error,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OSError,
    RuntimeError,
    MemoryError,
    OverflowError,
    UnicodeDecodeError,
  ) as e:
    raise WeightsFormatError(
      f"{source}: corrupt or truncated weights file ({type(e).__name__}: {e})"
    ) from None
  state = _find_state_dict(obj, source)
  if all(k.startswith("module.") for k in state):
    state = {k[len("module.") :]: v for k, v in state.items()}
  return state


# ----------------------------------------------------------------------------- name mapping

_BN_FIELDS = {
  "weight": ("params", "scale"),
  "bias": ("params", "bias"),
  "running_mean": ("batch_stats", "mean"),
  "running_var": ("batch_stats", "var"),
}
_IN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias")}


def _is_ignored(name: str) -> bool:
  return name.startswith("fc.") or name.endswith("num_batches_tracked")


def trunk_names(depth: int, ibn: bool = False) -> dict[str, str]:
  """torchvision (IBN-Net for ``ibn``) trunk key -> flattened Flax path, e.g.
  ``layer1.0.downsample.0.weight`` -> ``params/layer1_0/downsample_conv/kernel``."""
  kind, layers = block_layout(depth)
  names: dict[str, str] = {}

  def conv(torch_mod, flax_mod):
    names[f"{torch_mod}.weight"] = f"params/{flax_mod}/kernel"

  def norm(torch_mod, flax_mod, fields=_BN_FIELDS):
    for field, (collection, leaf) in fields.items():
      names[f"{torch_mod}.{field}"] = f"{collection}/{flax_mod}/{leaf}"

  conv("conv1", "conv1")
  norm("bn1", "bn1")
  convs = ("conv1", "conv2", "conv3") if kind == "bottleneck" else ("conv1", "conv2")
  for stage, blocks in enumerate(layers):
    for index in range(blocks):
      t, f = f"layer{stage + 1}.{index}", f"layer{stage + 1}_{index}"
      for i, c in enumerate(convs, start=1):
        conv(f"{t}.{c}", f"{f}/{c}")
        if i == 1 and ibn and stage < 3:
          norm(f"{t}.bn1.IN", f"{f}/bn1/IN", _IN_FIELDS)
          norm(f"{t}.bn1.BN", f"{f}/bn1/BN")
        else:
          norm(f"{t}.bn{i}", f"{f}/bn{i}")
      if index == 0 and (stage > 0 or BLOCK_EXPANSION[kind] != 1):
        conv(f"{t}.downsample.0", f"{f}/downsample_conv")
        norm(f"{t}.downsample.1", f"{f}/downsample_bn")
  return names


def _to_flax_layout(torch_name: str, array: np.ndarray) -> np.ndarray:
  if torch_name.endswith(".weight") and array.ndim == 4:
    return np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)))  # OIHW -> HWIO
  return array


def _to_torch_shape(flax_path: str, shape) -> tuple[int, ...]:
  shape = tuple(shape)
  if flax_path.endswith("/kernel") and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def is_flax_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """True for flattened Flax variables (``params/...``, ``batch_stats/...`` keys)."""
  return bool(state_dict) and all(k.startswith(("params/", "batch_stats/")) for k in state_dict)


def _map_torchvision(state_dict, depth, ibn):
  names = trunk_names(depth, ibn)
  mapped, unexpected = {}, []
  for key, value in state_dict.items():
    if key in names:
      mapped[names[key]] = (key, _to_flax_layout(key, np.asarray(value)))
    elif not _is_ignored(key):
      unexpected.append(key)
  missing = [key for key in names if key not in state_dict]
  return mapped, missing, unexpected


def flatten_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Nested variables -> ``{"params/layer1_0/conv1/kernel": leaf, ...}``."""
  flat = {}

  def walk(prefix, node):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(f"{prefix}/{k}" if prefix else str(k), v)
    else:
      flat[prefix] = node

  walk("", variables)
  return flat


def unflatten_variables(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of ``flatten_variables``."""
  nested: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = nested
    *parents, name = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return nested


def _mismatch_message(source, missing, unexpected, misshapen):
  lines = [f"{source}: weights do not fit the model"]
  if missing:
    lines.append(f"  missing from the file ({len(missing)}): " + ", ".join(missing))
  if unexpected:
    lines.append(f"  unexpected in the file ({len(unexpected)}): " + ", ".join(unexpected))
  if misshapen:
    lines.append(f"  shape mismatches ({len(misshapen)}):")
    lines.extend(f"    {name}: file {fs}, model {ms}" for name, fs, ms in misshapen)
  return "\n".join(lines)


def torchvision_to_flax(
  state_dict: Mapping[str, np.ndarray], *, depth: int, ibn: bool = False
) -> dict[str, dict]:
  """Maps a torchvision ResNet state dict onto ReIDResNet's trunk.

  Conv weights go from OIHW to HWIO kernels; batch norms' weight / bias / running_mean /
  running_var become scale / bias (``params``) and mean / var (``batch_stats``);
  ``downsample.0`` / ``.1`` become ``downsample_conv`` / ``downsample_bn``. With ``ibn``
  (IBN-Net ResNet-IBN-a), ``layerX.Y.bn1.IN.*`` / ``.BN.*`` of layer1-3 map to the IBN
  module's ``IN`` / ``BN``. ``fc.*`` and ``num_batches_tracked`` are ignored. Shapes are
  not checked here (``load_pretrained`` checks them against the model).

  Returns ``{"params": ..., "batch_stats": ...}`` nested like the model's variables.
  Raises WeightsMismatchError listing every missing and unexpected key.
  """
  mapped, missing, unexpected = _map_torchvision(state_dict, depth, ibn)
  if missing or unexpected:
    raise WeightsMismatchError(
      _mismatch_message(
        f"torchvision ResNet-{depth}{'-IBN-a' if ibn else ''} state dict", missing, unexpected, []
      )
    )
  return unflatten_variables({path: array for path, (_, array) in mapped.items()})


def apply_state_dict(
  state_dict: Mapping[str, np.ndarray],
  variables: Mapping[str, Any],
  *,
  depth: int,
  ibn: bool = False,
  source: str = "state dict",
) -> dict:
  """``variables`` with every trunk leaf replaced from ``state_dict`` (see load_pretrained)."""
  model_flat = flatten_variables(variables)
  if is_flax_state_dict(state_dict):
    # Already Flax paths: every trunk leaf is required; neck leaves load when present.
    entries = {k: (k, np.asarray(v)) for k, v in state_dict.items()}
    required = [k for k in model_flat if k.split("/")[1] not in NECK_MODULES]
    missing = [k for k in required if k not in entries]
    unexpected = [k for k in entries if k not in model_flat]
    flax_names = True
  else:
    entries, missing, unexpected = _map_torchvision(state_dict, depth, ibn)
    unexpected.extend(torch for path, (torch, _) in entries.items() if path not in model_flat)
    required_by_model = [
      k for k in model_flat if k.split("/")[1] not in NECK_MODULES and k not in entries
    ]
    # Trunk leaves the model has but the depth/ibn layout does not (wrong ibn flag, ...).
    names = trunk_names(depth, ibn)
    inverse = {v: k for k, v in names.items()}
    wanted = set(missing) | {inverse.get(k, k) for k in required_by_model}
    missing = [k for k in names if k in wanted] + sorted(k for k in wanted if k not in names)
    flax_names = False

  misshapen = []
  for path, (name, array) in entries.items():
    if path in model_flat and tuple(array.shape) != tuple(model_flat[path].shape):
      model_shape = tuple(model_flat[path].shape)
      file_shape = tuple(array.shape)
      if not flax_names:
        file_shape = tuple(np.asarray(state_dict[name]).shape)
        model_shape = _to_torch_shape(path, model_shape)
      misshapen.append((name, file_shape, model_shape))
  if missing or unexpected or misshapen:
    raise WeightsMismatchError(_mismatch_message(source, missing, unexpected, misshapen))

  out = {}
  for path, leaf in model_flat.items():
    if path in entries:
      out[path] = jnp.asarray(entries[path][1], dtype=leaf.dtype)
    else:
      out[path] = leaf
  return unflatten_variables(out)


def load_pretrained(
  path: str | os.PathLike,
  variables: Mapping[str, Any],
  *,
  depth: int,
  ibn: bool = False,
  max_bytes: int | None = None,
) -> dict:
  """A copy of the model's initialised ``variables`` with the trunk loaded from ``path``.

  ``path`` is anything ``read_state_dict`` reads: torchvision / IBN-Net ImageNet weights
  (e.g. ``resnet50-19c8e357.pth``, ``resnet50_ibn_a.pth.tar``) or an ``.npz`` written by
  ``python -m ccreid_jax.tools.convert_weights``. The GeM exponent and the BN neck keep their
  initialised values (unless a Flax-layout file carries them). Leaves are cast to the
  model's dtypes.

  Raises:
    WeightsMismatchError: listing every missing key, unexpected key (ignoring ``fc.*`` and
      ``num_batches_tracked``) and shape mismatch (name, file shape, model shape; conv
      shapes in the file's layout).
    WeightsFormatError / UnsafeCheckpointError / WeightsTooLargeError: see
      ``read_state_dict``; the file may hold at most ``max_bytes``, by default
      ``max_weights_bytes`` of the model's number of values.
  """
  if max_bytes is None:
    max_bytes = max_weights_bytes(
      sum(int(np.prod(np.shape(leaf))) for leaf in flatten_variables(variables).values())
    )
  state_dict = read_state_dict(path, max_bytes=max_bytes)
  return apply_state_dict(state_dict, variables, depth=depth, ibn=ibn, source=os.fspath(path))
