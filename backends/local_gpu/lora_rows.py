"""``RowLoRA``: the HF sampler's fast path for batches whose rows use different LoRA adapters.

Separate from ``sampler_hf.py`` because it is a self-contained alternative to peft's own
mixed-adapter batches, with state of its own (the forward hooks and the current row plan): the
engine asks it to ``refresh`` after the set of adapters changed, and for the context in which the
model's forward uses adapter ``names[i]`` for batch row ``i`` (``adapters``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class RowLoRA:
    """How the sampler's ``PeftModel`` applies one adapter per batch row (see ``refresh``)."""

    def __init__(self) -> None:
        self.fast = False  # LoRA deltas applied by our own hooks (see refresh)
        self._lora_plan: list[tuple[str, int, int]] | None = None
        self._hook_handles: list[Any] = []

    def refresh(self, peft, enabled: bool) -> None:
        """Choose how mixed-adapter batches run, after the set of adapters changed.

        peft's own mixed batches (``adapter_names``) index each LoRA layer's input with a Python
        list of rows per adapter, which costs a host-to-device copy, and so a stream sync, per
        layer and adapter. When every adapter layer is a plain ``lora.Linear`` (no DoRA or other
        variant, no ``modules_to_save``), we instead keep peft's adapter layers disabled (each
        computes only its base layer) and add ``B(A(x)) * scaling`` ourselves in a forward hook,
        on contiguous row slices (``_run_batch`` orders rows by adapter). Otherwise, or with
        ``lora_fast_path=False`` (``enabled``), peft's ``adapter_names`` path is used.
        ``peft`` is the engine's ``PeftModel``, None when no adapter is loaded.
        """
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []
        self.fast = False
        if peft is None:
            return
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer

        try:
            from peft.utils.other import AuxiliaryTrainingWrapper
        except ImportError:  # pragma: no cover - older peft
            AuxiliaryTrainingWrapper = ()  # type: ignore[assignment]
        ok = enabled
        layers = []
        for mod in peft.modules():
            if isinstance(mod, AuxiliaryTrainingWrapper):
                ok = False
            elif isinstance(mod, BaseTunerLayer):
                if type(mod) is not LoraLinear or getattr(mod, "lora_variant", None) \
                        or getattr(mod, "merged", False):
                    ok = False
                else:
                    layers.append(mod)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if ok:
                peft.base_model.disable_adapter_layers()
            else:
                peft.base_model.enable_adapter_layers()
        if ok:
            for mod in layers:
                self._hook_handles.append(
                    mod.register_forward_hook(self._lora_hook, with_kwargs=True))
            self.fast = True

    def _lora_hook(self, module, args, kwargs, output):
        plan = self._lora_plan
        if not plan:
            return None
        x = args[0] if args else kwargs.get("x", kwargs.get("input"))
        for name, a, b in plan:
            if name not in module.lora_A:
                continue
            lora_A = module.lora_A[name]
            xa = x[a:b]
            if xa.dtype != lora_A.weight.dtype:
                xa = xa.to(lora_A.weight.dtype)
            delta = module.lora_B[name](lora_A(module.lora_dropout[name](xa))) * module.scaling[name]
            output[a:b] += delta.to(output.dtype)
        return None

    @contextlib.contextmanager
    def _fast_adapters(self, names: list[str]):
        plan: list[tuple[str, int, int]] = []
        start = 0
        for i in range(1, len(names) + 1):
            if i == len(names) or names[i] != names[start]:
                if names[start] != BASE:
                    plan.append((names[start], start, i))
                start = i
        self._lora_plan = plan
        try:
            yield
        finally:
            self._lora_plan = None

    def adapters(self, peft, names: list[str]):
        """Context in which the model's forward uses adapter ``names[i]`` for batch row ``i``."""
        if peft is None:
            return contextlib.nullcontext()
        if self.fast:
            return self._fast_adapters(list(names))
        return peft._enable_peft_forward_hooks(adapter_names=list(names))
