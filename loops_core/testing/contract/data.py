"""Inputs the contract tests share: the France/Paris pair and small datums for every loss."""

from __future__ import annotations

from typing import Any

from loops_core import Datum, ModelInput, TensorData

PROMPT = "What is the capital of France?\nAnswer:"
ANSWER = " Paris"


def france(tokenizer: Any) -> tuple[list[int], list[int]]:
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    answer = tokenizer.encode(ANSWER, add_special_tokens=False)
    return prompt, answer


def sft_datum(prompt: list[int], answer: list[int]) -> Datum:
    """Next-token alignment: input = tokens[:-1], target[i] = tokens[i+1]; prompt targets masked."""
    tokens = prompt + answer
    targets = ([-100] * len(prompt) + answer)[1:]
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                 loss_fn_inputs={"target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)])})


def rl_datum(prompt: list[int], completion: list[int], sampler_logprobs: list[float], advantage: float) -> Datum:
    tokens = prompt + completion
    n = len(tokens) - 1
    targets = tokens[1:]
    mask = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": TensorData(data=targets, dtype="int64", shape=[n]),
        "logprobs": TensorData(data=[0.0] * (len(prompt) - 1) + list(sampler_logprobs), dtype="float32", shape=[n]),
        "advantages": TensorData(data=[advantage * m for m in mask], dtype="float32", shape=[n])})


def dpo_pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> list[Datum]:
    out = []
    for completion in (chosen, rejected):
        tokens = prompt + completion
        n = len(tokens) - 1
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
        out.append(Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
            "target_tokens": TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "weights": TensorData(data=weights, dtype="float32", shape=[n]),
            "ref_logprobs": TensorData(data=[-1.0] * n, dtype="float32", shape=[n])}))
    return out


def logprobs_of(output: Any, i: int = 0) -> list[float]:
    return output.loss_fn_outputs[i]["logprobs"].tolist()
