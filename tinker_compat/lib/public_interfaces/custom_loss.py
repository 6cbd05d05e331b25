"""Tinker's ``LossHandle`` / ``PerDatumLossFn`` names.

A ``LossHandle`` is a loss traced on the client and uploaded to Tinker's trainers
(``ServiceClient.create_custom_loss``). loops trainers run no uploaded graphs, so
``create_custom_loss`` raises ``NotImplementedError`` and ``forward_backward_custom`` takes the
loss as a Python callable instead (run on the client); the type is here so code that names it imports.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Concatenate, Mapping, Tuple

from ... import types

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.fx

__all__ = ["LossHandle", "PerDatumLossFn"]

# (logprobs, *the loss_fn_inputs it reads) -> (scalar loss, {"custom/<name>:sum|mean": scalar})
PerDatumLossFn = Callable[Concatenate["torch.Tensor", ...], Tuple["torch.Tensor", Mapping[str, "torch.Tensor"]]]


@dataclass(frozen=True)
class LossHandle:
    name: str
    inputs: Tuple[types.CustomLossInput, ...]
    session_id: str
    graph: "torch.fx.GraphModule" = field(repr=False, compare=False)
    loss_id: str | None = None

    @property
    def key(self) -> str:
        digest = hashlib.sha256(self.graph.code.encode())
        digest.update(repr(self.inputs).encode())
        return digest.hexdigest()

    @property
    def input_names(self) -> Tuple[str, ...]:
        return tuple(loss_input.name for loss_input in self.inputs[1:])
