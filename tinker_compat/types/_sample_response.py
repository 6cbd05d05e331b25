"""Sampling types: ``SamplingParams`` (frozen pydantic), ``SampledSequence`` / ``SampleResponse`` /
``PromptAltTokens`` / ``TopkLogprobs`` (frozen dataclasses with numpy fields and lazy list views)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import List, Literal, Optional, Sequence, Union

import numpy as np

from ._base import BaseModel
from ._tensor_data import TensorData

__all__ = ["PromptAltTokens", "SampleResponse", "SampledSequence", "SamplingParams", "StopReason", "TopkLogprobs"]

StopReason = Literal["length", "stop"]
MASK_LOGPROB = -99999.0  # logprob of an empty top-k slot (its token id is 0)


class SamplingParams(BaseModel):
    max_tokens: Optional[int] = None
    seed: Optional[int] = None
    stop: Union[str, Sequence[str], Sequence[int], None] = None  # None: stop at EOS; []: never stop early
    temperature: float = 1
    top_k: int = -1
    top_p: float = 1


@dataclass(frozen=True, slots=True)
class TopkLogprobs:
    """The top-k tokens at each position: two ``(length, k)`` matrices, empty slots ``(0, -99999.0)``."""

    token_ids: np.ndarray
    logprobs: np.ndarray


def topk_to_lists(topk: TopkLogprobs) -> list[list[tuple[int, float]] | None]:
    """Each position as a list of ``(token_id, logprob)`` pairs (empty slots dropped; all empty: None)."""
    out: list[list[tuple[int, float]] | None] = []
    for ids, lps in zip(topk.token_ids.tolist(), topk.logprobs.tolist()):
        pairs = [(i, lp) for i, lp in zip(ids, lps) if not (i == 0 and lp == MASK_LOGPROB)]
        out.append(pairs or None)
    return out


def topk_from_lists(rows: Sequence[Sequence[Sequence[float]] | None]) -> TopkLogprobs:
    """The matrices for per-position lists of ``[token_id, logprob]`` pairs."""
    k = max((len(row) for row in rows if row), default=0)
    ids = np.zeros((len(rows), k), dtype=np.int32)
    lps = np.full((len(rows), k), MASK_LOGPROB, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row or ()):
            ids[i, j], lps[i, j] = int(token), float(logprob)
    return TopkLogprobs(token_ids=ids, logprobs=lps)


@dataclass(frozen=True)
class PromptAltTokens:
    """``k`` alternative draws at each prompt position after the first: two ``[len(prompt) - 1, k]`` tensors."""

    tokens: TensorData
    logprobs: TensorData


@dataclass(frozen=True)
class SampledSequence:
    stop_reason: StopReason
    sequence_id: str
    tokens_np: Optional[np.ndarray] = field(default=None, repr=False)
    logprobs_np: Optional[np.ndarray] = field(default=None, repr=False)
    topk_logprobs_np: Optional[TopkLogprobs] = field(default=None, repr=False)
    _tokens_list: Optional[List[int]] = field(default=None, repr=False)
    _logprobs_list: Optional[List[float]] = field(default=None, repr=False)
    _topk_logprobs_list: Optional[List[Optional[List[tuple[int, float]]]]] = field(default=None, repr=False)

    @cached_property
    def tokens(self) -> List[int]:
        if self._tokens_list is not None:
            return self._tokens_list
        return self.tokens_np.tolist() if self.tokens_np is not None else []

    @cached_property
    def logprobs(self) -> Optional[List[float]]:
        if self._logprobs_list is not None:
            return self._logprobs_list
        return self.logprobs_np.tolist() if self.logprobs_np is not None else None

    @cached_property
    def topk_logprobs(self) -> Optional[List[Optional[List[tuple[int, float]]]]]:
        if self._topk_logprobs_list is not None:
            return self._topk_logprobs_list
        return topk_to_lists(self.topk_logprobs_np) if self.topk_logprobs_np is not None else None


@dataclass(frozen=True)
class SampleResponse:
    sequences: Sequence[SampledSequence]
    prompt_logprobs_np: Optional[np.ndarray] = field(default=None, repr=False)  # NaN where not computed
    topk_prompt_logprobs_np: Optional[TopkLogprobs] = field(default=None, repr=False)
    target_prompt_logprobs: Optional[TensorData] = None  # logprobs of the requested ids; 0.0 where the id was -1
    prompt_cache_hit_tokens: int = 0  # prompt tokens the sampler did not recompute
    prompt_alt_tokens: Optional[PromptAltTokens] = None
    _prompt_logprobs_list: Optional[List[Optional[float]]] = field(default=None, repr=False)
    _topk_prompt_logprobs_list: Optional[list[Optional[list[tuple[int, float]]]]] = field(default=None, repr=False)

    @cached_property
    def prompt_logprobs(self) -> Optional[List[Optional[float]]]:
        if self._prompt_logprobs_list is not None:
            return self._prompt_logprobs_list
        if self.prompt_logprobs_np is None:
            return None
        return [None if np.isnan(x) else x for x in self.prompt_logprobs_np.tolist()]

    @cached_property
    def topk_prompt_logprobs(self) -> Optional[list[Optional[list[tuple[int, float]]]]]:
        if self._topk_prompt_logprobs_list is not None:
            return self._topk_prompt_logprobs_list
        return topk_to_lists(self.topk_prompt_logprobs_np) if self.topk_prompt_logprobs_np is not None else None
