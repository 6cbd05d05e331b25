"""The ``loops`` command: list backends, serve a trainer/sampler pair, run one server.

::

    loops backends                               every backend and whether its extra is installed
    loops serve --model M [--engine fake|local]  a paired trainer + sampler in the foreground
    loops serve --api tinker [--engine fake|local] [--model M] [--port N]   Tinker's HTTP API, for the tinker SDK
    loops serve-trainer / serve-sampler ...      one server (the local backend starts these)
    loops emulate baseten [--port N] [--engine fake|local]   the Baseten control-plane emulator
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from typing import Any

import httpx


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--api", default="loops")
    if argv[:1] == ["serve"] and api.parse_known_args(argv[1:])[0].api == "tinker":  # its own options
        from .tinker_api.cli import main as serve_tinker_api

        return serve_tinker_api(argv[1:])
    parser = argparse.ArgumentParser(prog="loops", description="loops: LoRA post-training on pluggable backends")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("backends", help="list the registered backends")

    serve = sub.add_parser("serve", help="run a paired trainer and sampler in the foreground")
    _server_args(serve)
    serve.add_argument("--api", choices=["loops", "tinker"], default="loops",
                       help="loops: the trainer/sampler pair; tinker: Tinker's HTTP API on one port "
                            "(see `loops serve --api tinker --help`)")
    serve.add_argument("--trainer-port", type=int, default=8000)
    serve.add_argument("--sampler-port", type=int, default=8001)

    trainer = sub.add_parser("serve-trainer", help="run one trainer server")
    _server_args(trainer)
    trainer.add_argument("--port", type=int, default=0)
    trainer.add_argument("--sampler-url", default=None, help="the paired sampler, which receives published adapters")
    trainer.add_argument("--run-id", default=None)

    sampler = sub.add_parser("serve-sampler", help="run one sampler server")
    _server_args(sampler)
    sampler.add_argument("--port", type=int, default=0)

    emulate = sub.add_parser("emulate", help="run a control-plane emulator (e.g. baseten) on loopback")
    emulate.add_argument("target", choices=["baseten"])
    emulate.add_argument("rest", nargs=argparse.REMAINDER, help="options of the emulator (see --help)")

    args = parser.parse_args(argv)
    return {"backends": _backends, "serve": _serve, "serve-trainer": _serve_trainer,
            "serve-sampler": _serve_sampler, "emulate": _emulate}[args.command](args)


def _emulate(args: argparse.Namespace) -> int:
    import importlib

    # The emulator belongs to the baseten backend; loops_core names it without importing it.
    return importlib.import_module("loops_backends.baseten.emulator").cli_main(args.rest)


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: loops/tiny-qwen3, an HF id or a local directory")
    p.add_argument("--engine", default="local", choices=["fake", "local"], help="numpy fake or torch (default)")
    p.add_argument("--sampler-engine", default="auto", choices=["auto", "hf", "vllm"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--api-key", default=os.environ.get("LOOPS_API_KEY"), help="required off loopback")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)


def _backends(args: argparse.Namespace) -> int:
    from .plugins import collect_backends, resolve_backend_name

    selected = resolve_backend_name()
    rows = []
    for name, info in sorted(collect_backends().items()):
        ok = info.installed
        status = "installed" if ok else f"missing {', '.join(info.missing)} (pip install -e '.[{info.extra}]' in your loops checkout)"
        mark = "*" if name == selected else " "
        rows.append(f"{mark} {name:<9} {status:<52} {info.description}")
    print("Backends (* = selected by LOOPS_BACKEND, default local):")
    print("\n".join(rows))
    return 0


def _engines(args: argparse.Namespace) -> tuple[Any, Any]:
    """(make_trainer_engine, make_sampler_engine) for the server options."""
    from .assembly import EngineConfig, make_engines

    return make_engines(EngineConfig(model=args.model, engine=args.engine, sampler_engine=args.sampler_engine,
                                     rank=args.rank, seed=args.seed))


def _serve(args: argparse.Namespace) -> int:
    from .server.run import Listener, require_key_off_loopback, serve
    from .server.sampler import SamplerServer
    from .server.trainer import SamplerLink, TrainerServer

    require_key_off_loopback(args.host, args.api_key)
    make_trainer, make_sampler = _engines(args)
    sampler = SamplerServer(make_sampler(), api_key=args.api_key)
    link = SamplerLink(url="http://sampler", transport=httpx.ASGITransport(app=sampler.app),
                       headers={"Authorization": f"Api-Key {args.api_key}"} if args.api_key else None)
    trainer = TrainerServer(make_trainer(), run_id=f"run-{uuid.uuid4().hex[:12]}", sampler=link, seed=args.seed,
                            api_key=args.api_key)

    def ready(listeners: list[Listener]) -> None:
        t, s = listeners
        print(f"trainer: {t.url}\nsampler: {s.url}\n"
              f"connect: ServiceClient.local(trainer_url={t.url!r}, sampler_url={s.url!r})", flush=True)

    serve([Listener("trainer", trainer.app, args.host, args.trainer_port),
           Listener("sampler", sampler.app, args.host, args.sampler_port)], parent_pid=args.parent_pid, on_ready=ready)
    return 0


def _serve_trainer(args: argparse.Namespace) -> int:
    from .server.run import Listener, require_key_off_loopback, serve
    from .server.trainer import SamplerLink, TrainerServer

    require_key_off_loopback(args.host, args.api_key)
    make_trainer, _ = _engines(args)
    link = None
    if args.sampler_url:
        link = SamplerLink(url=args.sampler_url,
                           headers={"Authorization": f"Api-Key {args.api_key}"} if args.api_key else None)
    trainer = TrainerServer(make_trainer(), run_id=args.run_id or f"run-{uuid.uuid4().hex[:12]}", sampler=link,
                            seed=args.seed, api_key=args.api_key)
    serve([Listener("trainer", trainer.app, args.host, args.port)], parent_pid=args.parent_pid)
    return 0


def _serve_sampler(args: argparse.Namespace) -> int:
    from .server.run import Listener, require_key_off_loopback, serve
    from .server.sampler import SamplerServer

    require_key_off_loopback(args.host, args.api_key)
    _, make_sampler = _engines(args)
    sampler = SamplerServer(make_sampler(), api_key=args.api_key)
    serve([Listener("sampler", sampler.app, args.host, args.port)], parent_pid=args.parent_pid)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
