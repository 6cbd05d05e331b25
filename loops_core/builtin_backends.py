"""The built-in backends and their tokenizers, registered through the same hooks as third-party ones."""

from .hookspecs import hookimpl


@hookimpl
def register_backends(register):  # type: ignore[no-untyped-def]
    register("fake", "loops_backends.fake.backend:FakeBackend",
             description="deterministic numpy engine served in-process, for testing scripts in seconds")
    register("local", "loops_backends.local_gpu.backend:LocalBackend", extra="local",
             requires=("torch", "transformers", "peft"),
             description="torch + peft trainer and HF/vLLM sampler as subprocesses on this machine")
    register("modal", "loops_backends.modal.backend:ModalBackend", extra="modal", requires=("modal",),
             description="the local servers in Modal GPU containers")
    register("baseten", "loops_backends.baseten.backend:BasetenBackend",
             description="the Baseten Loops control plane")


@hookimpl
def register_tokenizers(register):  # type: ignore[no-untyped-def]
    register("loops/fake", "loops_backends.fake.tokenizer:load_fake_tokenizer")
    register("loops/tiny-qwen3", "loops_backends.local_gpu.tiny_model:resolve_model_path")


@hookimpl
def register_engines(register):  # type: ignore[no-untyped-def]
    register("fake", "loops_backends.engines:fake_trainer", "loops_backends.engines:fake_sampler")
    register("local", "loops_backends.engines:torch_trainer", "loops_backends.engines:torch_sampler")
