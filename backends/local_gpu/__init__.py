"""The local backend: a torch + peft trainer and an HF or vLLM sampler on this machine.

``tiny_model_path()`` returns (building on first use) the directory of ``loops/tiny-qwen3``, the
tiny Qwen3-architecture model the tests and the quickstart train offline. Importing this package
imports no torch; the engines do, when a server starts.
"""

from .tiny_model import TINY_MODEL_NAME, resolve_model_path, tiny_model_path

__all__ = ["TINY_MODEL_NAME", "resolve_model_path", "tiny_model_path"]
