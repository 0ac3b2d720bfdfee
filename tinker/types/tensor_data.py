"""TensorData: a dense (or CSR-sparse) int64 / float32 tensor, backed by a numpy array.

As in Tinker 0.20+, it is a frozen dataclass whose equality is identity (`eq=False`); `data` is a
property giving the values as a flat list. torch is optional and imported only when a torch method
is used.

As in Tinker 0.38, `TensorData.from_numpy(a)` keeps `a` itself when it already has the right dtype
and is writable (no copy), and `to_numpy()` returns that array: edits through either are seen by
both. A CSR-sparse tensor is densified with `pad_value` in the unlisted entries.
"""

import operator
import sys
from dataclasses import dataclass
from typing import Any, List, Literal, Optional

import numpy as np

__all__ = ["TensorData", "TensorDtype"]

TensorDtype = Literal["int64", "float32"]

_NUMPY_DTYPES = {"int64": np.dtype(np.int64), "float32": np.dtype(np.float32)}
_REPR_ITEMS = 16


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError("this TensorData method needs PyTorch, which is not installed: `pip install torch` "
                          "(or use to_numpy() / from_numpy())") from None
    return torch


def _is_torch_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor can only exist if torch was imported
    return torch is not None and isinstance(value, torch.Tensor)


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in _NUMPY_DTYPES:
        raise ValueError(f"TensorData dtype must be 'int64' or 'float32', got {dtype!r}")
    return name


def _index_list(name: str, values: Any) -> List[int]:
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"TensorData {name} must be a list of ints, got {values!r}")
    try:
        out = [operator.index(v) for v in values]
    except TypeError:
        raise ValueError(f"TensorData {name} must be a list of ints, got {values!r}") from None
    for v in out:  # numpy's index type: anything wider is no array dimension or index
        if not -(2**63) <= v < 2**63:
            raise ValueError(f"TensorData {name} holds {v}, which does not fit in 64 bits")
    return out


def _check_pad_value(pad_value: Any) -> int:
    """pad_value: an integer (numpy integers too, not bool), as the SDK takes it."""
    if isinstance(pad_value, (bool, np.bool_)) or not isinstance(pad_value, (int, np.integer)):
        raise TypeError(f"pad_value must be an integer, got {type(pad_value).__name__}: {pad_value!r}")
    return int(pad_value)


def _to_array(data: Any, dtype: np.dtype) -> np.ndarray:
    """Converts list / nested list / numpy / torch data to an array of `dtype`. A writable numpy
    array that already has `dtype` is kept as it is (shared, as the SDK shares it)."""
    if isinstance(data, np.ndarray) and data.dtype == dtype and data.flags.writeable:
        return data
    if _is_torch_tensor(data):
        data = _torch_to_numpy(data)
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"TensorData data must be a number list, a rectangular nested list or an array "
                         f"({exc})") from None
    if arr.dtype.kind not in "biuf":
        if arr.dtype.kind == "O":
            raise ValueError("TensorData data must hold numbers only, in nested lists of equal lengths "
                             "(got ragged lists, None, or integers too large for int64)")
        raise ValueError(f"TensorData data must hold numbers, got an array of dtype {arr.dtype}")
    if dtype.kind == "i" and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        # finite floats are truncated toward zero, as the SDK's astype does; NaN and inf have no value
        raise ValueError("TensorData with dtype 'int64' got NaN or infinite values")
    if dtype.kind == "i" and arr.dtype.kind == "f" and arr.size and not -(2.0**63) <= arr.min() <= arr.max() < 2.0**63:
        # astype would give -2**63 for them, silently
        worst = arr.max() if arr.max() >= 2.0**63 else arr.min()
        raise ValueError(f"TensorData with dtype 'int64' got {worst:g}, outside int64's range")
    if dtype.kind == "i" and arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError("TensorData int64 values out of range")
    return np.array(arr, dtype=dtype, copy=True)


def _torch_to_numpy(tensor) -> np.ndarray:
    torch = _import_torch()
    tensor = tensor.detach()
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    if tensor.is_complex():
        raise ValueError(f"TensorData cannot hold complex tensors (dtype {tensor.dtype})")
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    elif tensor.dtype != torch.int64:
        tensor = tensor.to(torch.int64)
    return tensor.cpu().resolve_conj().resolve_neg().numpy()


@dataclass(frozen=True, eq=False, init=False, repr=False)
class TensorData:
    """A tensor on the wire: `dtype` ('int64' or 'float32'), values, and an optional `shape`.

    `shape` None means 1-D. `data` is the flat list of stored values (for a CSR-sparse tensor,
    the listed values, with `sparse_crow_indices` / `sparse_col_indices` and a 2-D `shape`).
    `to_numpy()` returns the dense array shaped by `shape` (the one from_numpy was given, when it
    could be kept). `data=None` is an empty tensor.
    """

    dtype: TensorDtype
    shape: Optional[List[int]]
    sparse_crow_indices: Optional[List[int]]
    sparse_col_indices: Optional[List[int]]

    def __init__(self, data: Any = None, dtype: Optional[TensorDtype] = None, shape: Optional[List[int]] = None,
                 sparse_crow_indices: Optional[List[int]] = None, sparse_col_indices: Optional[List[int]] = None):
        if dtype is None:
            raise TypeError("TensorData needs a dtype: 'int64' or 'float32'")
        name = _dtype_name(dtype)
        arr = np.empty(0, dtype=_NUMPY_DTYPES[name]) if data is None else _to_array(data, _NUMPY_DTYPES[name])
        if shape is not None:
            shape = _index_list("shape", shape)
            if any(d < 0 for d in shape):
                raise ValueError(f"TensorData shape must have non-negative dimensions, got {shape}")
        sparse = sparse_crow_indices is not None or sparse_col_indices is not None
        if sparse:
            values = arr.reshape(-1)
            crow, col = self._check_csr(values.size, shape, sparse_crow_indices, sparse_col_indices)
            dense = np.zeros(shape, dtype=arr.dtype)  # to_numpy(pad_value=0), kept
            rows = np.repeat(np.arange(shape[0]), np.diff(crow))
            dense[rows, col] = values
        else:
            crow = col = None
            if shape is None:
                if arr.ndim != 1:  # nested lists / n-d arrays keep their shape
                    shape = list(arr.shape)
                dense = arr
            else:
                size = int(np.prod(shape, dtype=np.int64))
                if size != arr.size:
                    raise ValueError(f"TensorData shape {shape} holds {size} values, but data has {arr.size}")
                dense = arr.reshape(shape)
            values = dense.reshape(-1)
        object.__setattr__(self, "dtype", name)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "sparse_crow_indices", crow)
        object.__setattr__(self, "sparse_col_indices", col)
        object.__setattr__(self, "_array", dense)
        object.__setattr__(self, "_values", values)

    @staticmethod
    def _check_csr(nnz, shape, crow, col):
        if crow is None or col is None:
            raise ValueError("a sparse TensorData needs both sparse_crow_indices and sparse_col_indices")
        if shape is None or len(shape) != 2:
            raise ValueError(f"a sparse (CSR) TensorData needs a 2-D shape, got {shape}")
        crow = _index_list("sparse_crow_indices", crow)
        col = _index_list("sparse_col_indices", col)
        if len(crow) != shape[0] + 1 or crow[0] != 0 or any(b < a for a, b in zip(crow, crow[1:])):
            raise ValueError(f"sparse_crow_indices must be {shape[0] + 1} non-decreasing offsets starting at 0, "
                             f"got {crow}")
        if crow[-1] != nnz or len(col) != nnz:
            raise ValueError(f"a CSR TensorData with {nnz} values needs sparse_crow_indices ending at {nnz} and "
                             f"{nnz} sparse_col_indices, got {crow[-1]} and {len(col)}")
        if any(not 0 <= c < shape[1] for c in col):
            raise ValueError(f"sparse_col_indices must lie in [0, {shape[1]}), got {col}")
        return crow, col

    # -- values ----------------------------------------------------------------------------------

    @property
    def data(self) -> List:
        """The stored values as a flat python list (non-zero values only, if sparse)."""
        return self._values.tolist()

    def to_numpy(self, pad_value: int = 0) -> np.ndarray:
        """The dense values as a numpy array shaped by `shape` (1-D when shape is None); a sparse
        tensor's unlisted entries are `pad_value`. The array is the tensor's own (writable; shared
        with from_numpy's input), except for a sparse tensor padded with a non-zero value."""
        pad_value = _check_pad_value(pad_value)
        if self.sparse_crow_indices is None or pad_value == 0:
            return self._array
        dense = np.full(self.shape, pad_value, dtype=self._array.dtype)
        dense[self._csr_rows(), self.sparse_col_indices] = self._values
        return dense

    def tolist(self, pad_value: int = 0) -> List:
        """The dense values as a (nested) python list."""
        return self.to_numpy(pad_value).tolist()

    def to_torch(self, pad_value: int = 0):
        """The dense values as a new torch tensor (torch.int64 or torch.float32)."""
        torch = _import_torch()
        return torch.from_numpy(np.array(self.to_numpy(pad_value)))

    def _csr_rows(self) -> np.ndarray:
        return np.repeat(np.arange(self.shape[0]), np.diff(self.sparse_crow_indices))

    def __array__(self, dtype=None, copy=None):
        if dtype is None and copy is not True:
            return self._array
        return np.array(self._array, dtype=dtype)

    # -- constructors ----------------------------------------------------------------------------

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "TensorData":
        """Floating arrays become float32, signed integer arrays int64; the shape is kept.
        Unsigned, bool and other arrays raise ValueError (convert them first)."""
        if isinstance(array, np.generic):
            array = np.asarray(array)
        if not isinstance(array, np.ndarray):
            raise TypeError(f"TensorData.from_numpy expects a numpy array, got {type(array).__name__}")
        if array.dtype.kind == "f":
            dtype = "float32"
        elif array.dtype.kind == "i":
            dtype = "int64"
        else:
            raise ValueError(f"TensorData.from_numpy supports signed integer and floating arrays, got dtype "
                             f"{array.dtype}; convert it first, e.g. array.astype(np.int64) or "
                             f"array.astype(np.float32)")
        return cls(data=array, dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor) -> "TensorData":
        """Floating tensors (bfloat16 and float16 included) become float32, all others int64."""
        if not _is_torch_tensor(tensor):
            raise TypeError(f"TensorData.from_torch expects a torch.Tensor, got {type(tensor).__name__}")
        torch = _import_torch()
        if tensor.layout in (torch.sparse_coo, torch.sparse_csr):
            return cls.from_torch_sparse(tensor)
        arr = _torch_to_numpy(tensor)
        return cls(data=arr, dtype="int64" if arr.dtype.kind == "i" else "float32", shape=list(tensor.shape))

    @classmethod
    def from_torch_sparse(cls, tensor, pad_value: int = 0) -> "TensorData":
        """A 2-D torch tensor (dense, COO or CSR) stored in CSR form, leaving out the entries equal
        to `pad_value`. Other ranks are stored dense (CSR is 2-D)."""
        if not _is_torch_tensor(tensor):
            raise TypeError(f"TensorData.from_torch_sparse expects a torch.Tensor, got {type(tensor).__name__}")
        pad_value = _check_pad_value(pad_value)
        if tensor.dim() != 2:
            return cls.from_torch(tensor.to_dense() if tensor.layout != _import_torch().strided else tensor)
        dense = _torch_to_numpy(tensor)
        listed = dense != pad_value
        crow = np.concatenate([[0], np.cumsum(listed.sum(axis=1))])
        col = np.nonzero(listed)[1]
        return cls(data=dense[listed], dtype="int64" if dense.dtype.kind == "i" else "float32",
                   shape=list(tensor.shape), sparse_crow_indices=crow.tolist(), sparse_col_indices=col.tolist())

    # -- python protocol -------------------------------------------------------------------------

    def __reduce__(self):
        return (type(self), (self._values, self.dtype, self.shape, self.sparse_crow_indices, self.sparse_col_indices))

    def __repr__(self) -> str:
        values = self._values
        if values.size <= _REPR_ITEMS:
            shown = repr(values.tolist())
        else:
            shown = repr(values[:_REPR_ITEMS].tolist())[:-1] + f", ... ({values.size} values)]"
        text = f"TensorData(data={shown}, dtype={self.dtype!r}, shape={self.shape!r}"
        if self.sparse_crow_indices is not None:
            text += (f", sparse_crow_indices={self.sparse_crow_indices!r}, "
                     f"sparse_col_indices={self.sparse_col_indices!r}")
        return text + ")"
