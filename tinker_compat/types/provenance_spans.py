"""Mirrors ``tinker.types.provenance_spans`` (the same objects as ``tinker.types``)."""

from . import PromptProvenanceSpan, SampledProvenanceSpan, ProvenanceSpans

__all__ = ["PromptProvenanceSpan", "SampledProvenanceSpan", "ProvenanceSpans"]
