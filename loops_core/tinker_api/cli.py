"""``loops serve --api tinker``: Tinker's HTTP API on one port, for the stock ``tinker`` SDK.

::

    loops serve --api tinker [--engine fake|local] [--model M] [--host H] [--port N] [--api-key-file F]

Point the SDK at it with ``TINKER_BASE_URL=http://127.0.0.1:N`` and a ``TINKER_API_KEY`` (the SDK
insists on one that starts with ``tml-``; on loopback without a key any such value is accepted).
Off loopback an API key is required: ``LOOPS_API_KEY`` or ``--api-key-file`` (never a command-line
value, which other users of the machine can read in the process list).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..server.run import LOOPBACK, Listener, serve


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loops serve --api tinker", description=__doc__.split("\n\n")[0])
    p.add_argument("--api", choices=["tinker"], default="tinker")
    p.add_argument("--engine", default="local", choices=["fake", "local"],
                   help="loops backend behind the API: fake (numpy, in-process) or local (torch trainer + sampler)")
    p.add_argument("--model", default="loops/tiny-qwen3", help="the base model to serve (default loops/tiny-qwen3)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when ready)")
    p.add_argument("--api-key-file", default=None, help="a file holding the API key (else LOOPS_API_KEY)")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    return p


def api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise SystemExit(f"--api-key-file {args.api_key_file} is empty")
        return key
    return os.environ.get("LOOPS_API_KEY") or None


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        import google.protobuf  # noqa: F401
        import zstandard  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"loops serve --api tinker needs {exc.name}: pip install 'loops[tinker-api]'") from None
    key = api_key(args)
    if args.host not in LOOPBACK and not key:
        raise SystemExit(f"refusing to listen on {args.host} without an API key: set LOOPS_API_KEY or pass "
                         "--api-key-file (servers bind 127.0.0.1 unless told otherwise)")
    if key and not key.startswith("tml-"):
        print("warning: the tinker SDK only sends API keys that start with 'tml-'", file=sys.stderr)

    from ..errors import ConfigurationError
    from ..futures import run_sync
    from ..service_client import ServiceClient
    from .app import create_app
    from .service import TinkerService

    try:
        service = ServiceClient(backend=args.engine)
    except ConfigurationError as exc:  # e.g. --engine local without the [local] extra: say which pip command
        raise SystemExit(f"loops serve --api tinker: {exc}") from None
    svc = TinkerService(service, base_model=args.model, any_base_model=args.engine == "fake")

    def ready(listeners: list[Listener]) -> None:
        print(f"tinker API ({args.engine} engine, {args.model}): {listeners[0].url}\n"
              f"connect: TINKER_BASE_URL={listeners[0].url} TINKER_API_KEY={'<your key>' if key else 'tml-local'}",
              flush=True)

    try:
        serve([Listener("tinker", create_app(svc, api_key=key), args.host, args.port)],
              parent_pid=args.parent_pid, on_ready=ready)
    finally:
        run_sync(svc.close())
    return 0
