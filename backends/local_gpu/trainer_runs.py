"""The trainer's runs: one peft adapter + AdamW + accumulated gradients + step each, on one base.

Separate from ``trainer.py`` because it is bookkeeping, not math: which parameters belong to
which run, how a run's names are made stable for checkpoints, and how an idle run's tensors leave
the GPU and come back bit for bit (a cap on resident runs, ``max_resident_runs``).

Every run is a *named* adapter of the same ``PeftModel`` (peft's multi-adapter support): the run
``default`` is the adapter ``default``, others get ``r1``, ``r2``, ... (run ids are free text;
adapter names become module keys). peft computes only the active adapter in a forward, so runs
cannot see each other. Saved state and exported adapters always use the name ``default`` in their
keys, so a checkpoint of one run loads into any other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

SAVED_NAME = "default"  # the adapter name in saved optimizer keys, whatever the run


@dataclass
class RunState:
    run: str  # the id the server uses
    adapter: str  # the peft adapter name
    rank: int
    named_params: list[tuple[str, nn.Parameter]]  # names with the adapter name replaced by SAVED_NAME
    optimizer: torch.optim.Optimizer
    step: int = 0
    resident: bool = True  # tensors on the compute device (else on the offload device)
    # Where each optimizer-state tensor lived before an offload: (param index, key) -> device.
    state_devices: dict[tuple[int, str], torch.device] = field(default_factory=dict)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_params]


def adapter_params(model: nn.Module, adapter: str) -> list[tuple[str, nn.Parameter]]:
    """The LoRA parameters of ``adapter``, named with ``SAVED_NAME`` in place of the adapter."""
    pattern = re.compile(rf"\.lora_(A|B)\.{re.escape(adapter)}\.")
    out = []
    for name, p in model.named_parameters():
        if pattern.search(name):
            out.append((pattern.sub(lambda m: f".lora_{m.group(1)}.{SAVED_NAME}.", name), p))
    return out


def _move(t: Tensor, device: torch.device) -> Tensor:
    # copy=True: a move to the same device (a CPU engine in tests) still goes through a new
    # buffer, so the cap mechanism is exercised, and bit-exactness shown, without a GPU.
    return t.to(device, copy=True)


def offload(state: RunState, device: torch.device) -> None:
    """Move a run's weights, gradients and Adam moments to ``device`` (e.g. the CPU), exactly."""
    if not state.resident:
        return
    opt_state = state.optimizer.state
    for i, p in enumerate(state.params):
        for key, value in opt_state.get(p, {}).items():
            if isinstance(value, Tensor):
                state.state_devices[(i, key)] = value.device
                opt_state[p][key] = _move(value, device)
        p.data = _move(p.data, device)
        if p.grad is not None:
            p.grad = _move(p.grad, device)
    state.resident = False


def restore(state: RunState, device: torch.device) -> None:
    """Bring an offloaded run back to the compute ``device`` (the inverse of :func:`offload`)."""
    if state.resident:
        return
    opt_state = state.optimizer.state
    for i, p in enumerate(state.params):
        p.data = _move(p.data, device)
        if p.grad is not None:
            p.grad = _move(p.grad, device)
        for key, value in opt_state.get(p, {}).items():
            if isinstance(value, Tensor):
                opt_state[p][key] = _move(value, state.state_devices.get((i, key), device))
    state.state_devices.clear()
    state.resident = True
