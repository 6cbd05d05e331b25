"""Tinker's HTTP API served over loops (``loops serve --api tinker``), for the unmodified tinker SDK.

``proto`` describes the protobuf messages of the wire, ``convert`` maps wire bodies to loops types,
``futures`` holds Tinker's request futures, ``service`` maps each route to loops' public clients,
``app`` is the Starlette app, ``cli`` the command. The ``tinker`` package is never imported here.
"""

from .app import CLIENT_CONFIG, SDK_VERSION, create_app  # noqa: F401
from .service import TinkerService  # noqa: F401
