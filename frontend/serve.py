"""The OpenAI-compatible server's loop: uvicorn (on uvloop) over one EngineCore.

`python -m frontend` (frontend/__main__.py) spawns the engine and starts the tokenizer load
first, then imports this module (uvicorn, starlette and the endpoints) while they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import signal
import socket

import uvicorn

from engine_core.config import EngineConfig
from frontend.api_server import build_app
from frontend.api_state import ServerState
from frontend.async_llm import AsyncLLM
from frontend.cli import ServerArgs
from frontend.startup import Starting, seconds_since_process_start

logger = logging.getLogger("ringserve.frontend")

_DEAD_LINGER_S = 1.0
_HTTP = "httptools" if importlib.util.find_spec("httptools") else "h11"
# What uvicorn would import as it starts serving, after the engine is ready: imported now,
# while the engine loads.
importlib.import_module(f"uvicorn.protocols.http.{_HTTP}_impl")
importlib.import_module("uvicorn.lifespan.off")


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


async def serve(
    config: EngineConfig,
    args: ServerArgs,
    sock: socket.socket,
    served: tuple[str, str],
    starting: Starting,
) -> int:
    """Finish the start-up under way, serve on `sock` (bound, not listening) until a signal
    or the engine's death; the exit status. served: the model's default name and root."""
    default_name, model_root = served
    loop = asyncio.get_running_loop()
    try:
        engine = await AsyncLLM.start(config, client=starting.client, tokenizer=starting.tokenizer)
    except Exception as e:
        logger.error("the engine failed to start: %s", e)
        sock.close()
        return 1
    if starting.signals:
        logger.info("%s during start-up: stopping", signal.Signals(starting.signals[0]).name)
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
        logger.info("start-up: %s", starting.summary())

    uv_config = uvicorn.Config(
        app,
        http=_HTTP,
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
