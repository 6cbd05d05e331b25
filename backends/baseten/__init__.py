"""The Baseten backend: provisioning through the Baseten Loops control plane (``backend.py``),
its async client (``control_plane.py``), and a loopback emulator of it (``emulator.py``) that runs
fake or local trainer and sampler servers, for tests and offline work."""
