"""The data types users build and receive, as pydantic v2 models.

Two bases, split by direction:

* ``Request`` types (what a user builds: ``Datum``, ``SamplingParams``, ``AdamParams``, ...) forbid
  unknown fields, so a typo such as ``SamplingParams(max_token=16)`` fails at once.
* ``Response`` types (what a server sends back) ignore unknown fields, so an old client survives a
  newer server.

``TensorData`` is a flat list plus a dtype and a shape. It checks that the data fits the shape and
the dtype, and converts to and from numpy and torch (torch is imported only when asked for). A 2-D
tensor may travel in sparse CSR form (Tinker's ``sparse_crow_indices`` / ``sparse_col_indices``);
every reader densifies it with ``to_numpy(pad_value)``, so engines never see the difference.
"""

from __future__ import annotations

import base64
import math
from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, field_serializer, field_validator, model_serializer,
                      model_validator)
from typing_extensions import Annotated

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch


class Request(BaseModel):
    """Base of every type a user builds: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Response(BaseModel):
    """Base of every type a server returns: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------------------------
# TensorData
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# ModelInput
# --------------------------------------------------------------------------------------------


class EncodedTextChunk(Request):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[int]

    @property
    def length(self) -> int:
        return len(self.tokens)


class ImageChunk(Request):
    """An image, sent as standard base64; it occupies ``expected_tokens`` positions."""

    type: Literal["image"] = "image"
    data: bytes
    format: Literal["png", "jpeg"]
    expected_tokens: int = Field(gt=0)

    @field_validator("data", mode="before")
    @classmethod
    def _decode(cls, v: Any) -> bytes:
        if isinstance(v, str):
            return base64.b64decode(v, validate=True)
        return v

    @field_serializer("data")
    def _encode(self, v: bytes) -> str:
        return base64.b64encode(v).decode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes, format: Literal["png", "jpeg"], expected_tokens: int) -> "ImageChunk":
        return cls(data=data, format=format, expected_tokens=expected_tokens)

    def to_bytes(self) -> bytes:
        return self.data

    @property
    def length(self) -> int:
        return self.expected_tokens


ModelInputChunk = Annotated[Union[EncodedTextChunk, ImageChunk], Field(discriminator="type")]


class ModelInput(Request):
    """A tokenized prompt: a list of chunks. Build it with ``ModelInput.from_ints(ids)``."""

    chunks: list[ModelInputChunk] = Field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: list[int]) -> "ModelInput":
        return cls(chunks=[EncodedTextChunk(tokens=list(tokens))])

    @classmethod
    def empty(cls) -> "ModelInput":
        return cls(chunks=[])

    @property
    def length(self) -> int:
        return sum(c.length for c in self.chunks)

    def to_ints(self) -> list[int]:
        out: list[int] = []
        for c in self.chunks:
            if not isinstance(c, EncodedTextChunk):
                raise ValueError("ModelInput.to_ints: the input holds a non-text chunk (an image)")
            out.extend(c.tokens)
        return out

    def append(self, chunk: EncodedTextChunk | ImageChunk) -> "ModelInput":
        """A new ModelInput with ``chunk`` added at the end."""
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> "ModelInput":
        return self.append(EncodedTextChunk(tokens=[token]))


# --------------------------------------------------------------------------------------------
# Training inputs and configuration
# --------------------------------------------------------------------------------------------

LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "dpo", "gspo",
                     "stable_reinforce"]

# The dtype a plain list gets when a Datum is built from it, by key name (as in Tinker).
KEY_DTYPES: dict[str, DType] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "ref_logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
    "sequence_ratio_mask": "float32",
}


def to_tensor_data(key: str, value: Any) -> TensorData:
    """Convert a torch tensor, numpy array or plain list into TensorData (by key name for lists)."""
    if isinstance(value, TensorData):
        return value
    if isinstance(value, dict):
        return TensorData.model_validate(value)
    mod = type(value).__module__
    if mod.startswith("torch"):
        return TensorData.from_torch(value)
    if mod.startswith("numpy"):
        return TensorData.from_numpy(value)
    if isinstance(value, (list, tuple)):
        if key not in KEY_DTYPES:
            raise ValueError(
                f"loss_fn_inputs[{key!r}] is a plain list and {key!r} is not a known key; "
                "wrap it as TensorData(data=..., dtype=..., shape=...)"
            )
        return TensorData.from_list(list(value), KEY_DTYPES[key])
    raise ValueError(f"loss_fn_inputs[{key!r}] has unsupported type {type(value).__name__}")


class PromptProvenanceSpan(Request):
    """Datum positions that were positions ``[offset, offset + length)`` of the prompt of the
    sample request that returned ``sequence_id``."""

    type: Literal["prompt"] = "prompt"
    sequence_id: str = Field(min_length=1)
    offset: int = Field(default=0, ge=0)
    length: int = Field(ge=0)


class SampledProvenanceSpan(Request):
    """Datum positions that were tokens ``[offset, offset + length)`` sampled as ``sequence_id``."""

    type: Literal["sampled"] = "sampled"
    sequence_id: str = Field(min_length=1)
    offset: int = Field(default=0, ge=0)
    length: int = Field(ge=0)


ProvenanceSpan = Annotated[Union[PromptProvenanceSpan, SampledProvenanceSpan], Field(discriminator="type")]


class Datum(Request):
    """One training example: a ModelInput and its per-position loss inputs.

    ``loss_fn_inputs[k]`` has one entry per input position: ``target_tokens[i]`` is the label for
    the prediction made at position ``i``. Values may be TensorData, torch tensors, numpy arrays or
    plain lists (whose dtype comes from the key name).

    Provenance (needed by ``stable_reinforce``): ``model_input_spans`` tile the input tokens and
    ``loss_fn_input_spans`` tile ``target_tokens``, run by run, naming the sampled sequences they
    came from. Attach both with ``with_provenance``.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)
    routed_experts_ref: Any = None  # sent by the published client; unused here
    model_input_spans: list[ProvenanceSpan] | None = None
    loss_fn_input_spans: list[ProvenanceSpan] | None = None

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _convert(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: to_tensor_data(k, x) for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _check_spans(self) -> "Datum":
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise ValueError("Datum provenance comes as a pair: set model_input_spans and loss_fn_input_spans "
                             "together (Datum.with_provenance does)")
        return self

    @model_serializer(mode="wrap")
    def _ser(self, handler: Any) -> dict[str, Any]:
        # A datum without provenance keeps the wire shape it always had.
        out = handler(self)
        if self.model_input_spans is None:
            out.pop("model_input_spans", None)
            out.pop("loss_fn_input_spans", None)
        return out

    def with_provenance(self, model_input: list[Any], loss_fn_inputs: list[Any]) -> "Datum":
        """A copy carrying provenance: ``model_input`` spans tile the input tokens,
        ``loss_fn_inputs`` spans tile ``target_tokens``. Miscounted spans fail here."""
        _check_tiling("model_input", model_input, self.model_input.length)
        target = self.loss_fn_inputs.get("target_tokens")
        if target is not None and target.shape and len(target.shape) == 1:
            _check_tiling("loss_fn_inputs", loss_fn_inputs, target.shape[0])
        return type(self).model_validate({**dict(self), "model_input_spans": list(model_input),
                                     "loss_fn_input_spans": list(loss_fn_inputs)})


def _check_tiling(name: str, spans: list[Any], length: int) -> None:
    total = sum(getattr(s, "length", 0) for s in spans)
    if total != length:
        raise ValueError(f"with_provenance: the {name} spans cover {total} positions but the field has "
                         f"{length}; the runs must tile it exactly")


class AdamParams(Request):
    """Adam(W) hyperparameters. ``grad_clip_norm=0`` disables clipping; weight decay is decoupled."""

    learning_rate: float = Field(default=1e-4, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip_norm: float = Field(default=1.0, ge=0)


class SamplingParams(Request):
    """Generation controls. ``stop`` is a string, a list of strings or a list of token ids."""

    max_tokens: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(default=1.0, ge=0)
    top_k: int = -1
    top_p: float = Field(default=1.0, gt=0, le=1)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("SamplingParams.top_k must be -1 (disabled) or a positive integer")
        return v


class WandbConfig(Request):
    project: str
    name: str | None = None


class LoraConfig(Request):
    rank: int = Field(default=32, gt=0)
    seed: int | None = None
    train_unembed: bool = False
    train_mlp: bool = True
    train_attn: bool = True


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


class ForwardBackwardOutput(Response):
    """Result of forward / forward_backward.

    ``loss_fn_outputs`` has one dict per datum (``logprobs``: the trainer's logprob of each target,
    NaN where the target is masked). ``metrics`` keys are ``name:reduction`` (``loss:sum``, ...).
    """

    loss: float = 0.0
    loss_fn_output_type: str = "ArrayRecord"
    loss_fn_outputs: list[dict[str, TensorData]] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)


class OptimStepResponse(Response):
    metrics: dict[str, float] | None = None


class SaveWeightsResponse(Response):
    mode: str = "full"
    path: str


class SaveWeightsForSamplerResponse(Response):
    version: int = 0
    path: str


class LoadWeightsResponse(Response):
    step: int = 0
    path: str | None = None


class InitTrainerServerResponse(Response):
    step: int = 0
    lora_rank: int


StopReason = Literal["stop", "length"]


class SampledSequence(Response):
    tokens: list[int]
    logprobs: list[float] | None = None
    stop_reason: StopReason = "length"
    text: str | None = None
    sequence_id: str | None = None


class SampleResponse(Response):
    """Result of ``sample``; ``policy_version`` is the adapter version the sampler served."""

    sequences: list[SampledSequence]
    policy_version: int | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


SampleResult = SampleResponse


class LoraAdapterConfig(Response):
    r: int


class Checkpoint(Response):
    """A saved checkpoint (``checkpoint_id`` is the name it was saved under)."""

    id: str
    run_id: str
    checkpoint_id: str
    checkpoint_type: str
    created_at: str
    base_model: str | None = None
    lora_adapter_config: LoraAdapterConfig | None = None
    size_bytes: int | None = None
    sync_status: str | None = None
    target: str | None = None  # "sampler" | "trainer"
    path: str | None = None


class CheckpointFile(Response):
    url: str
    relative_file_name: str
    node_rank: int = 0
    size_bytes: int
    last_modified: str | None = None


class CheckpointFilesResponse(Response):
    presigned_urls: list[CheckpointFile]
    next_page_token: int | None = None
    total_count: int = 0


class CheckpointDownload(Response):
    dest_dir: str
    file_count: int
    bytes_written: int


class SupportedModel(Response):
    model_name: str
    max_context_length: int | None = None
    gpu_classes: list[str] = Field(default_factory=list)


class ServerCapabilities(Response):
    supported_models: list[SupportedModel]


class ModelData(Response):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(Response):
    model_data: ModelData
    model_name: str
    is_lora: bool = True
    lora_rank: int
    max_seq_len: int | None = None


__all__ = [
    "AdamParams", "Checkpoint", "CheckpointDownload", "CheckpointFile", "CheckpointFilesResponse",
    "Datum", "EncodedTextChunk", "ForwardBackwardOutput", "GetInfoResponse", "ImageChunk",
    "InitTrainerServerResponse", "KEY_DTYPES", "LoadWeightsResponse", "LoraAdapterConfig", "LoraConfig",
    "LossFnType", "ModelData", "ModelInput", "ModelInputChunk", "OptimStepResponse", "PromptProvenanceSpan",
    "ProvenanceSpan", "Request", "SampledProvenanceSpan",
    "Response", "SampleResponse", "SampleResult", "SampledSequence", "SamplingParams",
    "SaveWeightsForSamplerResponse", "SaveWeightsResponse", "ServerCapabilities", "StopReason",
    "SupportedModel", "TensorData", "WandbConfig", "to_tensor_data",
]
