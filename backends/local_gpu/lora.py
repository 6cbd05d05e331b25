"""Which layers get LoRA adapters, per model family.

=============================================  ==============================  =====================
family (``config.model_type``)                 attention                       MLP
=============================================  ==============================  =====================
qwen2, qwen3, llama, mistral, gemma, gemma2,   q_proj, k_proj, v_proj, o_proj  gate_proj, up_proj,
gemma3_text, phi3*, olmo2, granite                                             down_proj
gpt2, gpt_bigcode                              c_attn, c_proj (in attn)        c_fc, c_proj (in mlp)
anything else                                  every ``nn.Linear`` except ``lm_head`` (both switches
                                               must be on; names are the modules' last components)
=============================================  ==============================  =====================

(*) phi3 fuses ``qkv_proj`` and ``gate_up_proj``; those names are used for it.

Defaults: ``alpha = 32`` whatever the rank, so the LoRA scale is ``32 / rank``. A fresh adapter
has ``B = 0``; Adam moves each entry of ``B`` by about ``lr`` per step, so ``B @ A`` grows in
proportion to ``rank`` and the ``1 / rank`` in the scale cancels it: the same learning rate works
for every rank (the parametrisation Tinker and "LoRA Without Regret" use). Dropout 0 (dropout
would make the trainer's logprobs random, which breaks RL ratios), no bias, ``lora_A``
kaiming-uniform and ``lora_B`` zero (a fresh adapter leaves the model unchanged).
The embedding and ``lm_head`` are never adapted.
"""

from __future__ import annotations

from torch import nn

DEFAULT_ALPHA = 32

_LLAMA_LIKE = ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"})
TARGETS: dict[str, tuple[set[str], set[str]]] = {
    **{t: _LLAMA_LIKE for t in ("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2",
                                "gemma3_text", "olmo2", "granite")},
    "phi3": ({"qkv_proj", "o_proj"}, {"gate_up_proj", "down_proj"}),
    # GPT-2's c_proj appears in both attention and MLP; naming it once adapts both.
    "gpt2": ({"c_attn", "c_proj"}, {"c_fc", "c_proj"}),
    "gpt_bigcode": ({"c_attn", "c_proj"}, {"c_fc", "c_proj"}),
}


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") or ""


def lora_targets(model: nn.Module, *, train_attn: bool = True, train_mlp: bool = True) -> list[str]:
    """Module names (last components) that get LoRA, sorted; see the table above."""
    if not (train_attn or train_mlp):
        raise ValueError("LoRA needs at least one of train_attn / train_mlp")
    family = TARGETS.get(_model_type(model))
    if family is not None:
        attn, mlp = family
        names = (attn if train_attn else set()) | (mlp if train_mlp else set())
        if not (train_attn and train_mlp) and family[0] & family[1]:
            # A shared name (GPT-2's c_proj) would adapt both parts; drop it when only one is asked.
            names -= family[0] & family[1]
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        if names & present:
            return sorted(names & present)
    # Unknown family: every Linear except the output head.
    if not (train_attn and train_mlp):
        raise ValueError(f"train_attn/train_mlp cannot be split for unknown model type "
                         f"{_model_type(model)!r}; add it to loops_backends.local_gpu.lora.TARGETS")
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] != "lm_head"}
    if not names:
        raise ValueError("found no nn.Linear layers to adapt with LoRA")
    return sorted(names)


def make_lora_config(model: nn.Module, rank: int, alpha: float | None = None, *,
                     train_attn: bool = True, train_mlp: bool = True):
    """A ``peft.LoraConfig`` for ``model``: see the module docstring for the defaults."""
    from peft import LoraConfig, TaskType

    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return LoraConfig(
        r=rank,
        lora_alpha=DEFAULT_ALPHA if alpha is None else alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=lora_targets(model, train_attn=train_attn, train_mlp=train_mlp),
        task_type=TaskType.CAUSAL_LM,
        init_lora_weights=True,  # kaiming-uniform A, zero B
    )
