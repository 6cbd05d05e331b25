"""TensorData: a flat list, a dtype and a shape (dense, or 2-D sparse CSR)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import field_serializer, field_validator, model_serializer, model_validator

from ._base import Request

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

DType = Literal["int64", "int32", "float32", "float64", "float16", "bfloat16", "bool", "int8"]
_INT_DTYPES = {"int64", "int32", "int8"}
_FLOAT_DTYPES = {"float32", "float64", "float16", "bfloat16"}


def _flatten(data: Any) -> tuple[list[Any], list[int]]:
    """Flatten a nested list, returning (flat, shape); ragged input is an error."""
    if not isinstance(data, (list, tuple)):
        return [data], []
    if not data:
        return [], [0]
    parts = [_flatten(x) for x in data]
    inner = parts[0][1]
    if any(p[1] != inner for p in parts):
        raise ValueError("TensorData.data is ragged: every row must have the same length")
    return [v for p in parts for v in p[0]], [len(data), *inner]


class TensorData(Request):
    """A tensor on the wire: flat ``data``, a ``dtype`` name and a ``shape``.

    ``shape`` may be omitted for 1-D data. NaN travels as JSON ``null`` (masked positions in
    ``logprobs`` outputs are NaN).

    Sparse CSR form (2-D only, as in Tinker): ``data`` holds the listed values row by row,
    ``sparse_crow_indices`` the row pointers (rows + 1) and ``sparse_col_indices`` one column per
    value; every other cell is the ``pad_value`` given to ``to_numpy`` / ``to_torch`` / ``tolist``.
    """

    data: list[Any]
    dtype: DType
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None

    @field_validator("data", mode="before")
    @classmethod
    def _from_array(cls, v: Any) -> Any:
        # A numpy array (as Tinker accepts) is taken as its flat values.
        if not isinstance(v, (list, tuple)) and hasattr(v, "reshape") and hasattr(v, "tolist"):
            return v.reshape(-1).tolist()
        return v

    @model_validator(mode="after")
    def _check(self) -> "TensorData":
        if self.shape is None:
            if self.sparse_crow_indices is not None:
                raise ValueError("TensorData in sparse CSR form needs the dense shape")
            object.__setattr__(self, "shape", [len(self.data)])
        if any(d < 0 for d in self.shape):
            raise ValueError(f"TensorData.shape has a negative dimension: {self.shape}")
        n = math.prod(self.shape)
        if self.sparse_crow_indices is not None or self.sparse_col_indices is not None:
            self._check_csr()
        elif n != len(self.data):
            raise ValueError(
                f"TensorData.data has {len(self.data)} values but shape {self.shape} needs {n}; "
                "pass flat data whose length is the product of the shape"
            )
        if self.dtype in _INT_DTYPES or self.dtype == "bool":
            for v in self.data:
                if isinstance(v, float) or v is None:
                    if v is None or not float(v).is_integer():
                        raise ValueError(
                            f"TensorData.dtype is {self.dtype!r} but data holds {v!r}; "
                            "use dtype='float32' for real values"
                        )
        else:
            for v in self.data:
                if v is not None and not isinstance(v, (int, float)):
                    raise ValueError(f"TensorData.data holds {v!r}, which is not a number")
        return self

    def _check_csr(self) -> None:
        crow, col, shape = self.sparse_crow_indices, self.sparse_col_indices, self.shape
        if crow is None or col is None:
            raise ValueError("TensorData: sparse_crow_indices and sparse_col_indices come together")
        if len(shape) != 2:
            raise ValueError(f"TensorData: the sparse CSR form is 2-D only, got shape {shape}")
        rows, cols = shape
        if len(crow) != rows + 1 or crow[0] != 0 or any(b < a for a, b in zip(crow, crow[1:])):
            raise ValueError(f"TensorData.sparse_crow_indices must be {rows + 1} non-decreasing row "
                             "pointers starting at 0")
        if not crow[-1] == len(col) == len(self.data):
            raise ValueError(f"TensorData CSR: {len(self.data)} values, {len(col)} column indices and a last "
                             f"row pointer of {crow[-1]} must all agree")
        if any(not 0 <= c < cols for c in col):
            raise ValueError(f"TensorData.sparse_col_indices must lie in [0, {cols})")

    @field_serializer("data")
    def _ser_data(self, data: list[Any]) -> list[Any]:
        if self.dtype in _FLOAT_DTYPES:
            return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else v for v in data]
        return data

    @model_serializer(mode="wrap")
    def _ser(self, handler: Any) -> dict[str, Any]:
        # Dense tensors keep the plain {data, dtype, shape} wire shape.
        out = handler(self)
        if self.sparse_crow_indices is None:
            out.pop("sparse_crow_indices", None)
            out.pop("sparse_col_indices", None)
        return out

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def from_list(cls, data: list[Any], dtype: DType) -> "TensorData":
        flat, shape = _flatten(data)
        return cls(data=flat, dtype=dtype, shape=shape)

    @classmethod
    def from_numpy(cls, array: "np.ndarray") -> "TensorData":
        import numpy as np

        a = np.asarray(array)
        if a.dtype.kind == "f":  # as in Tinker: floats travel as float32, ints as int64
            dtype: str = "float32"
            a = a.astype(np.float32)
        elif a.dtype.kind in "iu":
            dtype, a = "int64", a.astype(np.int64)
        elif a.dtype.kind == "b":
            dtype = "bool"
        else:
            raise ValueError(f"TensorData.from_numpy: unsupported numpy dtype {a.dtype}")
        return cls(data=a.reshape(-1).tolist(), dtype=dtype, shape=list(a.shape))  # type: ignore[arg-type]

    @classmethod
    def from_torch(cls, tensor: "torch.Tensor") -> "TensorData":
        import torch

        t = tensor.detach().cpu()
        name = str(t.dtype).removeprefix("torch.")
        if name not in _INT_DTYPES | _FLOAT_DTYPES | {"bool"}:
            raise ValueError(f"TensorData.from_torch: unsupported torch dtype {t.dtype}")
        if t.dtype in (torch.bfloat16, torch.float16):
            data = t.float().reshape(-1).tolist()
        else:
            data = t.reshape(-1).tolist()
        return cls(data=data, dtype=name, shape=list(t.shape))  # type: ignore[arg-type]

    @classmethod
    def from_torch_sparse(cls, tensor: "torch.Tensor", pad_value: int = 0) -> "TensorData":
        """A 2-D tensor in CSR form, leaving out cells equal to ``pad_value``; dense when CSR
        would not be smaller (``rows + 1 + 2 * nnz >= rows * cols``) or the tensor is not 2-D."""
        import numpy as np

        pad_value = _check_pad(pad_value)
        dense = cls.from_torch(tensor)
        if len(dense.shape) != 2:
            return dense
        a = dense.to_numpy()
        keep = a != pad_value
        rows, cols = a.shape
        if rows + 1 + 2 * int(keep.sum()) >= rows * cols:
            return dense
        crow = [0, *np.cumsum(keep.sum(axis=1)).tolist()]
        return cls(data=a[keep].tolist(), dtype=dense.dtype, shape=[rows, cols],
                   sparse_crow_indices=crow, sparse_col_indices=np.nonzero(keep)[1].tolist())

    # ---- conversions ----------------------------------------------------------------------
    def to_numpy(self, pad_value: int = 0) -> "np.ndarray":
        """The tensor as numpy; a CSR tensor is densified with ``pad_value`` in unlisted cells."""
        import numpy as np

        np_dtype = {"bfloat16": "float32"}.get(self.dtype, self.dtype)
        if self.dtype in _FLOAT_DTYPES:
            flat = [math.nan if v is None else v for v in self.data]
        else:
            flat = self.data
        values = np.asarray(flat, dtype=np_dtype)
        if self.sparse_crow_indices is None:
            return values.reshape(self.shape)
        out = np.full(self.shape, _check_pad(pad_value), dtype=np_dtype)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.sparse_crow_indices))
        out[rows, np.asarray(self.sparse_col_indices, dtype=np.int64)] = values
        return out

    def to_torch(self, pad_value: int = 0) -> "torch.Tensor":
        import torch

        return torch.from_numpy(self.to_numpy(pad_value).copy()).to(getattr(torch, self.dtype))

    def tolist(self, pad_value: int = 0) -> list[Any]:
        """The data nested to ``shape`` (NaN for nulls in float tensors)."""
        return self.to_numpy(pad_value).tolist()


def _check_pad(pad_value: Any) -> int:
    import numpy as np

    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, np.integer)):
        raise TypeError(f"pad_value must be an integer, got {pad_value!r}")
    return int(pad_value)
