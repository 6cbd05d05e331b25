"""``TensorData``: a frozen dataclass over a numpy array (dense, or sparse CSR rows), as in Tinker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Literal, Optional, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

TensorDtype = Literal["int64", "float32"]
_NUMPY_DTYPES = {"int64": np.int64, "float32": np.float32}

__all__ = ["TensorData", "TensorDtype"]


@dataclass(frozen=True, eq=False, init=False)
class TensorData:
    dtype: TensorDtype
    shape: Optional[List[int]] = None
    sparse_crow_indices: Optional[List[int]] = None  # CSR row pointers (nrows + 1); data holds the listed values
    sparse_col_indices: Optional[List[int]] = None
    _numpy: np.ndarray = field(repr=False)

    def __init__(self, data: Union[List[int], List[float], np.ndarray, None] = None,
                 dtype: Optional[TensorDtype] = None, shape: Optional[List[int]] = None,
                 sparse_crow_indices: Optional[List[int]] = None,
                 sparse_col_indices: Optional[List[int]] = None) -> None:
        if dtype is None:
            raise TypeError("TensorData requires `dtype`")
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"Unsupported TensorDtype: {dtype}")
        array = np.asarray([] if data is None else data, dtype=_NUMPY_DTYPES[dtype])
        if isinstance(data, np.ndarray) and array is data and not data.flags.writeable:
            array = data.copy()  # torch.from_numpy warns on read-only buffers
        if sparse_crow_indices is None and shape is not None and list(array.shape) != list(shape):
            array = array.reshape(shape)
        for name, value in (("dtype", dtype), ("shape", shape), ("sparse_crow_indices", sparse_crow_indices),
                            ("sparse_col_indices", sparse_col_indices), ("_numpy", array)):
            object.__setattr__(self, name, value)

    @property
    def data(self) -> Union[List[int], List[float]]:
        """The values, flattened (for a sparse tensor: the listed values only)."""
        return self._numpy.ravel().tolist()

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        kind = array.dtype.kind
        if kind not in "fiu":
            raise ValueError(f"Unsupported numpy dtype: {array.dtype}")
        return cls(data=array, dtype="float32" if kind == "f" else "int64", shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        import torch

        array = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).detach().cpu().contiguous().numpy()
        return cls.from_numpy(array)

    @classmethod
    def from_torch_sparse(cls, tensor: torch.Tensor, pad_value: int = 0) -> TensorData:
        """A 2-D tensor as CSR rows leaving out ``pad_value`` entries, when that is smaller than dense."""
        pad_value = _check_pad_value(pad_value)
        if tensor.ndim != 2:
            return cls.from_torch(tensor)
        dense = tensor.detach().cpu().numpy()
        keep = dense != pad_value
        rows, cols = np.nonzero(keep)
        if (dense.shape[0] + 1) + 2 * len(rows) >= dense.size:
            return cls.from_torch(tensor)
        crow = np.zeros(dense.shape[0] + 1, dtype=np.int64)
        np.add.at(crow, rows + 1, 1)
        return cls(data=dense[keep], dtype="float32" if dense.dtype.kind == "f" else "int64",
                   shape=list(dense.shape), sparse_crow_indices=np.cumsum(crow).tolist(),
                   sparse_col_indices=cols.tolist())

    def to_numpy(self, pad_value: int = 0) -> np.ndarray:
        """The dense array (a sparse tensor's unlisted entries are ``pad_value``)."""
        if self.sparse_crow_indices is None:
            return self._numpy
        if self.sparse_col_indices is None or self.shape is None:
            raise ValueError("a sparse TensorData needs sparse_col_indices and shape")
        out = np.full(self.shape, _check_pad_value(pad_value), dtype=_NUMPY_DTYPES[self.dtype])
        counts = np.diff(np.asarray(self.sparse_crow_indices))
        out[np.repeat(np.arange(len(counts)), counts), np.asarray(self.sparse_col_indices, dtype=np.int64)] = \
            self._numpy.ravel()
        return out

    def to_torch(self, pad_value: int = 0) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.to_numpy(pad_value)))

    def tolist(self, pad_value: int = 0) -> List[Any]:
        return self.to_numpy(pad_value).tolist()


def _check_pad_value(pad_value: Any) -> int:
    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, np.integer)):
        raise TypeError(f"pad_value must be an integer, got {type(pad_value).__name__}: {pad_value!r}")
    return int(pad_value)
