"""Read a legacy (non-zip) PyTorch ``state_dict`` file into numpy arrays, without PyTorch.

The legacy format (``torch.save(..., _use_new_zipfile_serialization=False)``, the only one
before torch 1.6) is a run of pickles in one file: the magic number, the protocol version,
the system info, the object itself, then the list of storage keys; after them, for each
key in that order, an 8-byte little-endian element count and the storage's raw bytes.
Tensors in the object pickle are ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)`` calls whose storages are persistent ids ``('storage', storage_type, key,
location, numel[, view_metadata])`` (``torch/serialization.py``, ``_legacy_load``).

A pickle can call any importable function, so the unpickler here resolves only the storage
classes, ``_rebuild_tensor_v2`` and ``collections.OrderedDict``, and refuses the rest.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from capsedge.errors import CapsedgeError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# bfloat16 has no numpy dtype: it is read as uint16 and widened to float32.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(np.uint16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
STORAGE_MODULES = ("torch", "torch.cuda")


class WeightsError(CapsedgeError, ValueError):
    """A weights file is missing, not a legacy PyTorch file, corrupt, or does not fit the model."""


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass
class _Storage:
    key: str
    kind: str
    numel: int
    view: tuple[int, int] | None  # (offset, size) into the root storage ``key``


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise WeightsError(f"_rebuild_tensor_v2 expects a storage, received {type(storage).__name__}")
    try:
        return _TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))
    except (TypeError, ValueError) as err:
        raise WeightsError(f"bad tensor record: offset {offset!r}, size {size!r}, stride {stride!r}") from err


class _Unpickler(pickle.Unpickler):
    """An unpickler that builds only storages, tensor records and ordered dicts."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module in STORAGE_MODULES and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise WeightsError(f"refusing to unpickle {module}.{name}: only torch storages and tensors allowed")

    def persistent_load(self, pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise WeightsError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise WeightsError(f"bad storage record {pid!r:.80}")
        key = str(key)
        root = self.storages.setdefault(key, _Storage(key, storage_type.name, numel, None))
        if view is None:
            return root
        view_key, view_offset, view_size = view
        if not 0 <= view_offset <= view_offset + view_size <= root.numel:
            raise WeightsError(f"storage view {view!r} out of range for storage {key} of {root.numel}")
        return self.storages.setdefault(
            str(view_key), _Storage(key, storage_type.name, view_size, (view_offset, view_size))
        )


def _load(unpickler: _Unpickler, what: str) -> Any:
    try:
        return unpickler.load()
    except WeightsError:
        raise
    except Exception as err:  # garbage can make the unpickler raise almost anything
        raise WeightsError(f"cannot read the {what} (corrupt, or not a PyTorch checkpoint)") from err


def _read_storage(f: BinaryIO, storage: _Storage, byteorder: str, remaining: int) -> np.ndarray:
    header = f.read(8)
    if len(header) < 8:
        raise WeightsError(f"file truncated before storage {storage.key}")
    (count,) = struct.unpack("<q", header)
    dtype = STORAGE_DTYPES[storage.kind].newbyteorder(byteorder)
    if count != storage.numel:
        raise WeightsError(f"storage {storage.key} holds {count} elements, the pickle says {storage.numel}")
    nbytes = count * dtype.itemsize
    if nbytes > remaining - 8:
        raise WeightsError(f"file truncated in storage {storage.key} ({nbytes} bytes expected)")
    data = np.frombuffer(f.read(nbytes), dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
    if storage.kind == "BFloat16Storage":
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data


def _materialise(ref: _TensorRef, flat: np.ndarray, name: str) -> np.ndarray:
    if len(ref.size) != len(ref.stride) or any(s < 0 for s in ref.size + ref.stride) or ref.offset < 0:
        raise WeightsError(f"{name}: bad size {ref.size} / stride {ref.stride}")
    if 0 not in ref.size:
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
        if last >= flat.size:
            raise WeightsError(f"{name}: size {ref.size}, stride {ref.stride} overrun storage of {flat.size}")
    elif ref.offset > flat.size:
        raise WeightsError(f"{name}: offset {ref.offset} beyond storage of {flat.size}")
    strides = tuple(s * flat.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat[ref.offset :], ref.size, strides, writeable=False)
    return np.array(view, order="C")


def read_torch_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a legacy (non-zip) ``torch.save`` of a ``state_dict`` without importing torch.

    Args:
        path: the ``.pth`` / ``.pt`` file.

    Returns:
        ``{name: array}`` in the file's order, every entry included (also integer ones such
        as ``num_batches_tracked``), each array C-contiguous and in native byte order.

    Raises:
        WeightsError: the file is missing, a zip-format or otherwise foreign file, truncated,
            or references a class other than torch storages, tensors and ``OrderedDict``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise WeightsError(f"cannot read weights file {path}: {err.strerror or err}") from err
    if raw[:4] == b"PK\x03\x04":
        raise WeightsError(f"{path} is a zip-format torch file; only the legacy (non-zip) format is read")
    f = io.BytesIO(raw)
    header = _Unpickler(f)
    if _load(header, "magic number") != LEGACY_MAGIC:
        raise WeightsError(f"{path} is not a legacy PyTorch file (bad magic number)")
    if _load(header, "protocol version") != LEGACY_PROTOCOL:
        raise WeightsError(f"{path}: unsupported legacy PyTorch protocol version")
    sys_info = _load(header, "system info")
    byteorder = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"
    unpickler = _Unpickler(f)
    state = _load(unpickler, "state dict")
    keys = _load(_Unpickler(f), "storage keys")
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    if (
        not isinstance(keys, list)
        or len(set(keys)) != len(keys)
        or {str(k) for k in keys} != {s.key for s in unpickler.storages.values() if s.view is None}
    ):
        raise WeightsError(f"{path}: the storage key list does not match the tensors")
    roots: dict[str, np.ndarray] = {}
    for key in map(str, keys):
        storage = unpickler.storages[key]
        roots[key] = _read_storage(f, storage, byteorder, len(raw) - f.tell())
    result: dict[str, np.ndarray] = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            raise WeightsError(f"{path}: entry {name!r} is a {type(ref).__name__}, not a tensor")
        flat = roots[ref.storage.key]
        if ref.storage.view is not None:
            start, size = ref.storage.view
            flat = flat[start : start + size]
        result[str(name)] = _materialise(ref, flat, str(name))
    return result
