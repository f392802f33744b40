"""``simdiff serve``: a local web page to sample the shipped model and your runs.

    simdiff serve [RUN_DIR_OR_FILE ...] [--host 127.0.0.1] [--port 8000] [--device auto]

The page picks a model (the shipped image models: the class-conditional MNIST model, id ``pretrained``, its 4-step
distilled student, ``pretrained-student``, and the Fashion-MNIST model, ``pretrained-fashion``; and every run directory,
checkpoint directory or exported ``.safetensors`` named on the command line; a distilled student carries the
sampler, steps and grid it was distilled for), class labels, sampler, steps, step grid, guidance weight and interval,
seed and number of images, and shows the grid with the sampler's progress. The server binds to 127.0.0.1 unless
told otherwise, samples only the models it was started with (the page names them by id; no request parameter is a
path), runs one request at a time per model with a bounded queue, and answers a bad parameter with one line naming
it. Image editing is not offered yet.

Needs the ``serve`` extra (Starlette and uvicorn); this package imports them only when the app is built.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from simdiff.configuration import ConfigError

__all__ = ["add_serve_parser", "cmd_serve", "create_app", "build_entries", "make_entry", "parse_request",
           "ModelEntry", "Limits", "ParamError", "PRETRAINED", "listen_socket"]

_LOOPBACK_NAMES = ["127.0.0.1", "localhost"]
#: names re-exported from :mod:`simdiff.serve.models`, imported on first use (``simdiff --help`` stays quick).
_LAZY = ("PRETRAINED", "Limits", "ModelEntry", "ParamError", "build_entries", "make_entry", "parse_request")


def __getattr__(name: str):
    if name in _LAZY:
        from simdiff.serve import models

        return getattr(models, name)
    raise AttributeError(f"module 'simdiff.serve' has no attribute {name!r}")


def create_app(*args, **kwargs):
    """:func:`simdiff.serve.app.create_app` (imported on use: it needs Starlette)."""
    _require_extra()
    from simdiff.serve.app import create_app as _create

    return _create(*args, **kwargs)


def _require_extra() -> None:
    missing = []
    for mod in ("starlette", "uvicorn"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ConfigError(f"simdiff serve needs {' and '.join(missing)}: pip install 'simdiff[serve]'")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to ``subparsers`` (its handler is :func:`cmd_serve`)."""
    p = subparsers.add_parser(
        "serve", help="a local web page to sample the shipped model and your runs",
        description="Start a local web page to sample the shipped MNIST model and the given runs / exports "
                    "(pick a model, labels, sampler, steps, guidance, seed; see the grid with progress).")
    p.add_argument("sources", nargs="*", metavar="RUN_DIR_OR_FILE",
                   help="run directories, checkpoint directories or exported .safetensors files to offer besides "
                        "the shipped model; the page samples these and nothing else")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; the page has no login)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--device", default="auto",
                   help="auto (the first CUDA device if there is one, else the CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--max-images", dest="max_images", type=int, default=64, help="images per request (default 64)")
    p.add_argument("--max-queue", dest="max_queue", type=int, default=4,
                   help="requests that may wait per model while one runs (default 4); more are answered 429")
    p.set_defaults(func=cmd_serve)
    return p


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening (refused with one line naming ``--host`` / ``--port``)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r}: cannot resolve ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the models, bind the port, serve until interrupted. Bad flags / sources raise a one-line error."""
    from simdiff.devices import resolve_device
    from simdiff.serve.models import Limits, build_entries

    _require_extra()
    for flag, value, low in (("--max-images", args.max_images, 1), ("--max-queue", args.max_queue, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be an integer >= {low}, got {value}")
    device = resolve_device(args.device, what="--device")
    sock = listen_socket(args.host, args.port)  # before loading: a taken port fails at once
    try:
        import uvicorn

        entries = build_entries(args.sources, device=device)
        allowed = _LOOPBACK_NAMES if args.host in _LOOPBACK_NAMES else None
        app = create_app(entries, limits=Limits(max_images=args.max_images, max_queue=args.max_queue),
                         device=device, allowed_hosts=allowed)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"simdiff serve: {len(entries)} model(s) ({', '.join(e.id for e in entries)}) on {device}; "
              f"open http://{shown}:{port}/  (Ctrl-C stops)", flush=True)
        if not _is_loopback(args.host):
            print(f"simdiff serve: warning: bound to {args.host}, so other machines can reach this page; it has no "
                  f"login", file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
