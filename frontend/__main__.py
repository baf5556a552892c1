"""`python -m frontend`: the OpenAI-compatible server (uvicorn on uvloop) over one EngineCore."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import sys

import uvicorn

from engine_core.config import EngineConfig
from engine_core.model_files import resolve_model
from frontend.api_server import build_app
from frontend.api_state import ServerState
from frontend.async_llm import AsyncLLM
from frontend.cli import ServerArgs, parse_args

logger = logging.getLogger("ringserve.frontend")

_DEAD_LINGER_S = 1.0


def served_model(config: EngineConfig) -> tuple[str, str]:
    """The name and root /v1/models shows; a dummy model from --hf-config is named after it
    (so that it needs no default model package installed beside it)."""
    if config.load_format == "dummy" and config.hf_config is not None and config.model is None:
        path = os.path.abspath(config.hf_config)
        stem = os.path.splitext(os.path.basename(path))[0]
        return (os.path.basename(os.path.dirname(path)) if stem == "config" else stem), path
    files = resolve_model(config.model)
    return files.name, files.gguf_path or files.directory


def seconds_since_process_start() -> float:
    """Wall time since this process was created (the ready line reports it)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


class _Server(uvicorn.Server):
    """uvicorn's server with our signal handling: SIGTERM drains, and nothing is re-raised
    afterwards (uvicorn re-raises the signal, which would turn a clean drain into exit 143)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, on_ready) -> None:
        super().__init__(config)
        self.state = state
        self.on_ready = on_ready

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def on_signal(self, sig: int) -> None:
        if self.should_exit:
            if sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for requests
            return
        logger.info(
            "%s: draining; in-flight requests get up to %.0f s to finish",
            signal.Signals(sig).name,
            self.state.args.drain_timeout,
        )
        self.state.draining = True
        self.should_exit = True
        # Past the grace period, requests end with finish_reason "abort" rather than a cut
        # connection; uvicorn's own timeout (a little later) is only the backstop.
        loop = asyncio.get_running_loop()
        loop.call_later(self.state.args.drain_timeout, self.state.engine.abort_all)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_ready()


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


async def serve(config: EngineConfig, args: ServerArgs) -> int:
    """Start the engine, serve until a signal or the engine's death; the exit status."""
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        return 1
    loop = asyncio.get_running_loop()
    stop_early: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_early.append, sig)
    try:
        default_name, model_root = served_model(config)
        engine = await AsyncLLM.start(config)
    except Exception as e:
        logger.error("the engine failed to start: %s", e)
        sock.close()
        return 1
    if stop_early:
        logger.info("%s during start-up: stopping", signal.Signals(stop_early[0]).name)
        engine.shutdown()
        sock.close()
        return 0
    model_name = args.served_model_name or default_name
    app = build_app(engine, args, model_name, model_root)
    host, port = sock.getsockname()[:2]

    def on_ready() -> None:
        r = engine.ready
        logger.info(
            "ready in %.2f s: http://%s:%d serving %s (max_model_len %d, %d KV blocks of %d)",
            seconds_since_process_start(),
            host,
            port,
            model_name,
            r.max_model_len,
            r.num_blocks,
            r.block_size,
        )

    uv_config = uvicorn.Config(
        app,
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        ws="none",
        lifespan="off",
        access_log=False,  # AccessLog logs each request, with its tokens
        log_config=None,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.drain_timeout + 5.0,  # type: ignore[arg-type]  # a float works
        timeout_keep_alive=5,
    )
    server = _Server(uv_config, app.state, on_ready)

    def on_dead(reason: str) -> None:
        # Linger a moment, answering 503 with the reason, before exiting: clients and probes
        # polling the server learn why rather than meeting a refused connection.
        loop.call_later(_DEAD_LINGER_S, setattr, server, "should_exit", True)

    engine.on_dead = on_dead
    try:
        await server.serve(sockets=[sock])
    finally:
        died = engine.dead_reason
        engine.shutdown()
        sock.close()
    if died is not None and not app.state.draining:
        logger.error("exiting with status 1: %s", died)
        return 1
    if died is not None:  # e.g. a SIGTERM sent to the whole process group
        logger.warning("the engine core stopped while draining: %s", died)
    logger.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config, args))
    return uvloop.run(serve(config, args))


if __name__ == "__main__":
    sys.exit(main())
