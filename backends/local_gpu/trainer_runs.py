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

import contextlib
import copy
import itertools
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .lora import make_lora_config

try:  # the multi-run contract's names (loops_core.engine gains them with the many-runs server)
    from loops_core.engine import DEFAULT_RUN
except ImportError:  # pragma: no cover - until that lands
    DEFAULT_RUN = "default"

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


class ManyRuns:
    """The run bookkeeping of ``TorchTrainerEngine`` (a mixin: it uses the engine's ``config``,
    ``base``, ``model``, ``device`` and ``_set_modes``)."""

    def _init_runs(self) -> None:
        self._runs: OrderedDict[str, RunState] = OrderedDict()  # least recently used first
        self._current: RunState | None = None
        self._adapter_ids = itertools.count(1)
        self.model = None  # the peft wrapper, made by the first init_lora

    @property
    def runs(self) -> list[str]:
        return list(self._runs)

    @property
    def current(self) -> RunState:
        if self._current is None:
            raise LookupError("no current run: call init_lora(rank, seed, run=...) first")
        return self._current

    # The current run's view, under the names the engine has always had.
    lora_rank = property(lambda self: self.current.rank)
    named_params = property(lambda self: self.current.named_params if self._current else [])
    params = property(lambda self: self.current.params if self._current else [])
    optimizer = property(lambda self: self.current.optimizer)

    @property
    def step(self) -> int:
        return self.current.step

    @step.setter
    def step(self, value: int) -> None:
        self.current.step = int(value)

    def init_lora(self, rank: int, seed: int | None, *, run: str = DEFAULT_RUN) -> None:
        config = make_lora_config(self.base if self.model is None else self.causal_lm, rank,
                                  self.config.lora_alpha, train_attn=self.config.train_attn,
                                  train_mlp=self.config.train_mlp)
        self._make_adapter(config, seed, run)

    def use_run(self, run: str) -> None:
        state = self._runs.get(run)
        if state is None:
            raise LookupError(f"unknown run {run!r}; this trainer holds {sorted(self._runs)}")
        self._activate(state)

    def close_run(self, run: str) -> None:
        state = self._runs.pop(run, None)
        if state is None:
            return
        if self._current is state:
            self._current = None
        if not self._runs:  # the last run: back to the bare base model
            self.base = self.model.unload()
            self.model = None
        else:
            self._delete_adapter(state.adapter)
        state.optimizer.state.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _make_adapter(self, lora_config, seed: int | None, run: str = DEFAULT_RUN) -> None:
        from peft import get_peft_model

        old = self._runs.pop(run, None)
        if old is not None:  # a reset: drop the old adapter, make a new one under the same name
            if self._current is old:
                self._current = None
            if self._runs:
                self._delete_adapter(old.adapter)
            else:
                self.base = self.model.unload()  # the base modules back, without LoRA (no reload)
                self.model = None
            adapter = old.adapter
        else:
            adapter = DEFAULT_RUN if run == DEFAULT_RUN else f"r{next(self._adapter_ids)}"
        lora_config = copy.deepcopy(lora_config)
        lora_config.base_model_name_or_path = None  # get_peft_model sets it to the resolved path
        lora_config.inference_mode = False  # a saved adapter_config.json says True: it would freeze LoRA
        # peft creates the LoRA matrices on the CPU (then moves them), so a CPU generator seeded
        # here gives the same adapter on every device. fork_rng keeps the caller's RNG untouched.
        # Without a seed the global RNG is used (and advanced), so each unseeded init differs.
        # get_peft_model and add_adapter visit the layers in the same order, so a run's seeded
        # adapter is the same whether or not other runs exist.
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        rng = torch.random.fork_rng(devices=devices) if seed is not None else contextlib.nullcontext()
        with rng, warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # peft vs transformers 5 names
            if seed is not None:
                torch.manual_seed(seed)
            if self.model is None:
                self.model = get_peft_model(self.base, lora_config, adapter_name=adapter)
                # Once, not per run: moving the whole model would also move offloaded runs back.
                self.model.to(self.device)
            else:
                self.model.add_adapter(adapter, lora_config)
        # export_adapter records the name the user passed, not our resolved directory.
        self.model.peft_config[adapter].base_model_name_or_path = self.base_model
        named = adapter_params(self.model, adapter)
        for _, p in named:  # add_adapter puts new LoRA weights beside the base layer's weights
            if p.device != self.device:
                p.data = p.data.to(self.device)
        state = RunState(run=run, adapter=adapter, rank=lora_config.r, named_params=named,
                         optimizer=self._optimizer_for([p for _, p in named]))
        self._runs[run] = state
        self.causal_lm = self.model.get_base_model()  # the HF model, LoRA layers injected
        self.decoder = self.causal_lm.get_decoder()  # stops at the final norm
        self.lm_head = self.causal_lm.get_output_embeddings()  # tied or not, the same module call
        self._activate(state)

    def _delete_adapter(self, adapter: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Adapter X was active which is now deleted"
            if adapter in self.model.active_adapters:
                other = next(r.adapter for r in self._runs.values() if r.adapter != adapter)
                self.model.set_adapter(other)
            self.model.delete_adapter(adapter)

    def _activate(self, state: RunState) -> None:
        """Make ``state`` the current run: its adapter active and trainable, its tensors on the
        device, and (over the ``max_resident_runs`` cap) the least recently used others off it."""
        self._runs.move_to_end(state.run)  # most recently used last
        restore(state, self.device)
        if self.model.active_adapter != state.adapter:
            self.model.set_adapter(state.adapter)  # also sets requires_grad: only this one trains
        self._set_modes()
        self._current = state
        cap = self.config.max_resident_runs
        if cap is not None:
            resident = [r for r in self._runs.values() if r.resident and r is not state]
            for idle in resident[:max(0, len(resident) + 1 - cap)]:
                offload(idle, torch.device(self.config.offload_device))

    @property
    def resident_runs(self) -> list[str]:
        return [r.run for r in self._runs.values() if r.resident]

    def _optimizer_for(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        # AdamW over the LoRA parameters only; hyper-parameters are set on every optim_step.
        # Gradients live as zero tensors (not None), so "accumulated gradient" is always defined.
        # fused: one kernel for all LoRA tensors on CUDA; foreach: a few vectorised ops on CPU.
        cuda = self.device.type == "cuda"
        for p in params:
            p.grad = torch.zeros_like(p)
        return torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0,
                                 fused=cuda or None, foreach=None if cuda else True)

    def _new_optimizer(self) -> None:
        """A fresh AdamW for the current run (zero gradients, no moments)."""
        self.current.optimizer = self._optimizer_for(self.current.params)
