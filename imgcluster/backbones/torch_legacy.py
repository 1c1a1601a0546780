"""Read PyTorch's legacy (pre-1.6, non-zip) ``.pth`` files without importing torch.

The EfficientNet-Lite weights ship in this format. Installing torch (~700 MB) just to read
17 MB of floats is not worth it, and the format is five pickles and raw bytes in a row:

1. the magic number ``0x1950a86a20f9469cfc6c``;
2. the protocol version ``1001``;
3. a dict of system info (byte order, type sizes);
4. the state dict, whose tensors are rebuilt through ``torch._utils._rebuild_tensor_v2`` and
   whose storages are pickle *persistent ids*
   ``('storage', storage_class, key, location, numel, view_metadata)``;
5. a list of storage keys, then for each key an 8-byte little-endian element count and the raw
   little-endian data.

Unpickling uses an allow-list (`_SafeUnpickler.find_class`), so a weights file cannot run code.
"""

from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from imgcluster.errors import InvalidWeights

__all__ = ["InvalidWeights", "load_state_dict"]

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL = 1001
_ZIP_SIGNATURE = b"PK\x03\x04"

# Storage class name -> numpy dtype of its elements, always little-endian on disk.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only the dtype matters here."""

    name: str
    dtype: np.dtype


@dataclass
class _Storage:
    """A storage whose bytes come after the pickles; filled in once they are read."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _StorageView:
    """A legacy storage *view*: ``numel`` elements from ``offset`` of a base storage."""

    base: _Storage
    offset: int
    numel: int


@dataclass(frozen=True)
class _LazyTensor:
    """What ``_rebuild_tensor_v2`` returns before the storage bytes are known."""

    storage: _Storage | _StorageView
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: _Storage | _StorageView,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    *_ignored: Any,
) -> _LazyTensor:
    # The remaining arguments (requires_grad, backward hooks, metadata) mean nothing to numpy.
    return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the few globals a state dict needs."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a state dict")

    def persistent_load(self, pid: Any) -> _Storage | _StorageView:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        base = self.storages.get(key)
        if base is None:
            base = self.storages[key] = _Storage(key, storage_type.dtype, int(numel))
        if view_metadata is None:
            return base
        _view_key, view_offset, view_size = view_metadata
        return _StorageView(base, int(view_offset), int(view_size))


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a legacy PyTorch ``.pth`` state dict into numpy arrays.

    Parameters
    ----------
    path : str or Path
        A file written by ``torch.save(state_dict, path, _use_new_zipfile_serialization=False)``
        (the default before torch 1.6).

    Returns
    -------
    dict of str to ndarray
        Tensor name to a C-contiguous array with the tensor's shape and dtype, in file order.
        Size, stride and storage offset are honoured, so transposed or sliced tensors come out
        as torch would show them.

    Raises
    ------
    InvalidWeights
        If the file is missing, truncated, in the zip format of torch >= 1.6, or holds anything
        other than tensors in (ordered) dicts.

    Examples
    --------
    >>> from imgcluster.backbones.efficientnet_lite import weights_path
    >>> state = load_state_dict(weights_path("efficientnet-lite0"))
    >>> state["_conv_stem.weight"].shape
    (32, 3, 3, 3)
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            if f.read(4) == _ZIP_SIGNATURE:
                raise InvalidWeights(
                    f"{path} is a zip-format PyTorch file (torch >= 1.6); only the legacy format "
                    "is supported. Re-save it with torch.save(state_dict, path, "
                    "_use_new_zipfile_serialization=False)."
                )
            f.seek(0)
            return _read(f)
    except InvalidWeights:
        raise
    except OSError as exc:
        raise InvalidWeights(f"cannot read weights file {path}: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError) as exc:
        raise InvalidWeights(f"{path} is not a readable legacy PyTorch state dict: {exc}") from exc


def _read(f: IO[bytes]) -> dict[str, np.ndarray]:
    magic = _SafeUnpickler(f).load()
    if magic != _MAGIC:
        raise ValueError("bad magic number")
    protocol = _SafeUnpickler(f).load()
    if protocol != _PROTOCOL:
        raise ValueError(f"unsupported protocol version {protocol!r}")
    sys_info = _SafeUnpickler(f).load()
    if not sys_info.get("little_endian", False):
        raise ValueError("big-endian files are not supported")

    unpickler = _SafeUnpickler(f)
    state = unpickler.load()
    keys = _SafeUnpickler(f).load()
    for key in keys:
        (count,) = struct.unpack("<q", _read_exactly(f, 8))
        storage = unpickler.storages.get(key)
        if storage is None:
            raise ValueError(f"storage {key!r} is listed but no tensor uses it")
        raw = _read_exactly(f, count * storage.dtype.itemsize)
        storage.data = np.frombuffer(raw, dtype=storage.dtype)

    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict, found {type(state).__name__}")
    return {str(name): _materialise(name, tensor) for name, tensor in state.items()}


def _read_exactly(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"file truncated: wanted {n} bytes, got {len(data)}")
    return data


def _materialise(name: str, tensor: Any) -> np.ndarray:
    if not isinstance(tensor, _LazyTensor):
        raise ValueError(f"entry {name!r} is a {type(tensor).__name__}, not a tensor")
    storage, offset = tensor.storage, tensor.offset
    if isinstance(storage, _StorageView):
        storage, offset = storage.base, storage.offset + offset
    if storage.data is None:
        raise ValueError(f"no data for storage {storage.key!r} of {name!r}")
    data = storage.data
    if any(n == 0 for n in tensor.size):
        return np.zeros(tensor.size, dtype=data.dtype)
    # Check bounds before as_strided, which would otherwise read past the buffer silently.
    last = offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride, strict=True))
    if offset < 0 or last >= data.size or any(s < 0 for s in tensor.stride):
        raise ValueError(f"tensor {name!r} lies outside its storage")
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[offset:],
        shape=tensor.size,
        strides=tuple(s * item for s in tensor.stride),
        writeable=False,
    )
    # Copy: frees the file buffer and gives an ordinary array (ascontiguousarray would turn
    # 0-d scalars such as num_batches_tracked into shape (1,)).
    return view.copy(order="C")
