"""The ``loops`` command: list backends, serve a trainer/sampler pair, run one server.

::

    loops backends                               every backend and whether its extra is installed
    loops serve --model M [--engine fake|local]  a paired trainer + sampler in the foreground
    loops serve --api tinker [--engine fake|local] [--model M] [--port N]   Tinker's HTTP API, for the tinker SDK
    loops serve-trainer / serve-sampler ...      one server (the local backend starts these)
    loops emulate baseten [--port N] [--engine fake|local]   the Baseten control-plane emulator
    loops --version

Servers read their API key from ``LOOPS_API_KEY`` or ``--api-key-file PATH``, never from the
command line (process arguments are visible to every user in ``ps``).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import uuid
from pathlib import Path
from typing import Any



def main(argv: list[str] | None = None) -> int:
    from . import __version__

    argv = sys.argv[1:] if argv is None else list(argv)
    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--api", default="loops")
    if argv[:1] == ["serve"] and api.parse_known_args(argv[1:])[0].api == "tinker":  # its own options
        from .tinker_api.cli import main as serve_tinker_api

        return serve_tinker_api(argv[1:])
    parser = argparse.ArgumentParser(prog="loops", description="loops: LoRA post-training on pluggable backends")
    parser.add_argument("--version", action="version", version=f"loops {__version__}")
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
    if getattr(args, "api_key", None) is not None:
        parser.error("--api-key is not accepted: a key on the command line is visible to every user in `ps`. "
                     "Set LOOPS_API_KEY or pass --api-key-file PATH")
    if hasattr(args, "api_key_file"):
        args.api_key = _read_api_key(parser, args.api_key_file)
    if getattr(args, "checkpoint_root", None):  # read by CheckpointStore when it checks a path
        roots = [os.environ.get("LOOPS_CHECKPOINT_ROOTS", ""), *args.checkpoint_root]
        os.environ["LOOPS_CHECKPOINT_ROOTS"] = os.pathsep.join(r for r in roots if r)
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
    p.add_argument("--api-key", default=None, help=argparse.SUPPRESS)  # refused: see _read_api_key
    p.add_argument("--api-key-file", default=None,
                   help="file holding the API key (else LOOPS_API_KEY); required off loopback, >= 16 characters")
    p.add_argument("--checkpoint-root", action="append", default=[], metavar="DIR",
                   help="a directory (besides $LOOPS_HOME/runs) that load paths may point into; repeatable "
                        "(also LOOPS_CHECKPOINT_ROOTS)")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                   help="info logs one line per request (default: LOOPS_LOG_LEVEL, else info for serve, "
                        "warning for serve-trainer/serve-sampler)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-runs", type=int, default=64, help="runs a trainer hosts at once (503 past it)")
    p.add_argument("--max-resident-adapters", type=int, default=16,
                   help="adapters a sampler keeps loaded; the least recently used idle one goes past it")
    placement = p.add_argument_group("GPU placement (default: planned from the GPUs present and their free memory)")
    placement.add_argument("--trainer-device", default=None, help="e.g. cuda:0")
    placement.add_argument("--sampler-device", default=None, help="e.g. cuda:1 (HF sampler)")
    placement.add_argument("--gpu-memory-share", type=float, default=None,
                           help="share of the sampler GPU's memory vLLM may take (0-1]")
    placement.add_argument("--activation-headroom-gb", type=float, default=None,
                           help="GPU memory kept for the trainer's activations when the sampler shares its GPU "
                                "(also LOOPS_ACTIVATION_HEADROOM_GB)")
    placement.add_argument("--max-lora-rank", type=int, default=None,
                           help="largest adapter rank the vLLM sampler accepts (default: from --rank)")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)


def _read_api_key(parser: argparse.ArgumentParser, path: str | None) -> str | None:
    if not path:
        return os.environ.get("LOOPS_API_KEY") or None
    try:
        key = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        parser.error(f"--api-key-file {path}: {exc.strerror}")
    if not key:
        parser.error(f"--api-key-file {path} is empty")
    return key


def _log_level(args: argparse.Namespace) -> str:
    # `loops serve` is watched by a person: a line per request. The servers a backend starts log to a
    # file: warnings only, unless asked.
    default = "info" if args.command == "serve" else "warning"
    return args.log_level or os.environ.get("LOOPS_LOG_LEVEL") or default


def _publish_token() -> str:
    """The secret a trainer shows its sampler when publishing (``X-Loops-Publish-Token``)."""
    return os.environ.get("LOOPS_PUBLISH_TOKEN") or ""


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
    from .assembly import make_engines

    return make_engines(_engine_config(args))


def _engine_config(args: argparse.Namespace) -> Any:
    from .assembly import EngineConfig

    return EngineConfig(
        model=args.model, engine=args.engine, sampler_engine=args.sampler_engine, rank=args.rank, seed=args.seed,
        trainer_device=args.trainer_device, sampler_device=args.sampler_device,
        gpu_memory_share=args.gpu_memory_share, activation_headroom_gb=args.activation_headroom_gb,
        max_lora_rank=args.max_lora_rank)


def _serve(args: argparse.Namespace) -> int:
    from .assembly import in_process_pair
    from .server.run import Listener, require_key_off_loopback, serve

    require_key_off_loopback(args.host, args.api_key)
    # Only the paired trainer may move the sampler's policy version.
    trainer, sampler = in_process_pair(
        _engine_config(args), run_id=f"run-{uuid.uuid4().hex[:12]}", api_key=args.api_key,
        publish_token=_publish_token() or secrets.token_urlsafe(24), max_runs=args.max_runs,
        max_resident=args.max_resident_adapters)

    def ready(listeners: list[Listener]) -> None:
        t, s = listeners
        print(f"trainer: {t.url}\nsampler: {s.url}\n"
              f"connect: ServiceClient.local(trainer_url={t.url!r}, sampler_url={s.url!r})", flush=True)

    serve([Listener("trainer", trainer.app, args.host, args.trainer_port, flag="--trainer-port"),
           Listener("sampler", sampler.app, args.host, args.sampler_port, flag="--sampler-port")],
          parent_pid=args.parent_pid, on_ready=ready, log_level=_log_level(args))
    return 0


def _serve_trainer(args: argparse.Namespace) -> int:
    from .server.run import Listener, require_key_off_loopback, serve
    from .server.trainer import TrainerServer
    from .wire import Endpoint

    require_key_off_loopback(args.host, args.api_key)
    make_trainer, _ = _engines(args)
    link = None
    if args.sampler_url:
        headers = {"Authorization": f"Api-Key {args.api_key}"} if args.api_key else {}
        if _publish_token():
            headers["X-Loops-Publish-Token"] = _publish_token()
        link = Endpoint(url=args.sampler_url, headers=headers)
    trainer = TrainerServer(make_trainer(), run_id=args.run_id or f"run-{uuid.uuid4().hex[:12]}", sampler=link,
                            seed=args.seed, api_key=args.api_key, max_runs=args.max_runs)
    serve([Listener("trainer", trainer.app, args.host, args.port)], parent_pid=args.parent_pid,
          log_level=_log_level(args))
    return 0


def _serve_sampler(args: argparse.Namespace) -> int:
    from .server.run import Listener, require_key_off_loopback, serve
    from .server.sampler import SamplerServer

    require_key_off_loopback(args.host, args.api_key)
    _, make_sampler = _engines(args)
    sampler = SamplerServer(make_sampler(), api_key=args.api_key, max_resident=args.max_resident_adapters)
    sampler.publish_token = _publish_token() or None
    serve([Listener("sampler", sampler.app, args.host, args.port)], parent_pid=args.parent_pid,
          log_level=_log_level(args))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
