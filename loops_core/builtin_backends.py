"""The built-in backends, registered through the same hook as third-party ones."""

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
