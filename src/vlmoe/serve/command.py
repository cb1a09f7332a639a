"""`vlmoe serve`: the command. Imports nothing of the web stack until it runs, so that `vlmoe`
works without the `serve` extra and says how to install it when asked to serve."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder written by vlmoe train")
    p.add_argument(
        "--compare",
        default=None,
        metavar="DIR",
        help="a second checkpoint, answering the same input side by side (e.g. dense vs MoE)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only)",
    )
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=4.0,
        help="largest image upload accepted, in MiB (default: 4)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--access-log", action="store_true", help="log every request on stdout")


def run(args: argparse.Namespace) -> int:
    """Serve a web page that answers questions about images and shows the routing.

    One page at http://HOST:PORT/ (served by the package, works offline): pick an example or
    upload an image, ask; see the top answers, each MoE layer's experts per patch and per word,
    and the request's expert load beside the training average. JSON API: POST /api/ask
    (multipart: image, question), GET /api/health, GET /api/info. Stop with Ctrl-C.
    """
    from vlmoe.cli import UsageError, parse_device

    try:
        import uvicorn

        from vlmoe.serve.app import create_app
    except ImportError as e:
        raise UsageError(
            f"serve: the web stack is not installed ({e.name} missing); "
            "install it with: pip install 'vlmoe[serve]'"
        ) from None
    import torch

    from vlmoe.serve.examples import easyvqa_examples
    from vlmoe.serve.inference import load_served_model

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port: expected 0 to 65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise UsageError(f"--max-upload-mb: expected > 0, got {args.max_upload_mb}")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads: expected >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    sock = _listen(args.host, args.port)  # first: a busy port fails before minutes of loading
    try:
        models = [load_served_model(args.checkpoint, "a", device)]
        if args.compare:
            models.append(load_served_model(args.compare, "b", device))
        app = create_app(models, easyvqa_examples(), int(args.max_upload_mb * 1024 * 1024))
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    names = " | ".join(str(m.checkpoint.path) for m in models)
    print(f"vlmoe serve: http://{shown}:{port}/  ({names})", flush=True)
    if not _is_loopback(host):
        print(f"vlmoe: warning: listening on {host}: reachable from other machines", flush=True)
    config = uvicorn.Config(
        app, log_level="warning", access_log=args.access_log, timeout_graceful_shutdown=2
    )
    uvicorn.Server(config).run(sockets=[sock])
    print("vlmoe serve: stopped", file=sys.stderr, flush=True)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket, so that a busy port is one clear error line (and port 0 picks a free
    port whose number is printed before serving)."""
    from vlmoe.cli import UsageError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: cannot resolve ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UsageError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
