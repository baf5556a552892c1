"""`python -m frontend`: the OpenAI-compatible server (uvicorn on uvloop) over one EngineCore.

Start-up order (figures in the README): parse the command line, bind the port (a taken one
fails at once), resolve the model (a bad path fails before any process starts), spawn the
EngineCore and start the tokenizer load (frontend/startup.py), and only then import the
HTTP stack (frontend/serve.py), while the engine loads on the other core.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from types import FrameType

from engine_core.config import EngineConfig
from engine_core.model_files import resolve_model
from frontend.cli import parse_args

logger = logging.getLogger("ringserve.frontend")


def served_model(config: EngineConfig) -> tuple[str, str]:
    """The name and root /v1/models shows; a dummy model from --hf-config is named after it
    (so that it needs no default model package installed beside it)."""
    if config.load_format == "dummy" and config.hf_config is not None and config.model is None:
        path = os.path.abspath(config.hf_config)
        stem = os.path.splitext(os.path.basename(path))[0]
        return (os.path.basename(os.path.dirname(path)) if stem == "config" else stem), path
    files = resolve_model(config.model)
    return files.name, files.gguf_path or files.directory


def _bind(host: str, port: int) -> socket.socket:
    """Bind now, listen later: a taken port fails before the slow engine start."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # Until the server's loop takes them over: a signal during start-up stops the server
    # once the engine is up (it is then shut down cleanly, its queues released).
    early: list[int] = []

    def note_signal(sig: int, frame: FrameType | None) -> None:
        early.append(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, note_signal)
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        return 1
    try:
        served = served_model(config)
    except Exception as e:
        logger.error("the engine failed to start: %s", e)
        sock.close()
        return 1
    from frontend import startup

    starting = startup.start(config)
    starting.signals = early
    from frontend.serve import serve  # the HTTP stack, imported while the engine starts

    starting.done_at["HTTP stack imported"] = startup.seconds_since_process_start()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config, args, sock, served, starting))
    return uvloop.run(serve(config, args, sock, served, starting))


if __name__ == "__main__":
    sys.exit(main())
