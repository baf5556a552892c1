"""What every endpoint is given (the ServerState) and how what it returns or raises becomes an
HTTP response (`endpoint`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from engine_core.protocol import SamplingParams
from engine_core.structured_output.manager import GRAMMAR_ERROR_MARK
from frontend.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from frontend.cli import ServerArgs
from frontend.metrics import Metrics
from frontend.openai_chat import ChatCompletionRequest
from frontend.openai_completions import CompletionRequest
from frontend.openai_protocol import RequestError, now
from frontend.openai_sampling import sampling_params

logger = logging.getLogger("ringserve.frontend")

# A request the engine failed (or an engine that died) while it ran.
FAILED = (EngineDeadError, RequestFailedError)


@dataclass
class ServerState:
    """What every handler needs: the engine, the server's settings, the metrics."""

    engine: AsyncLLM
    args: ServerArgs
    model_name: str
    model_root: str
    metrics: Metrics
    created: int = field(default_factory=now)
    draining: bool = False

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise RequestError(f"The model `{name}` does not exist.", 404, param="model")

    def check_accepting(self, num_new: int = 0) -> None:
        """503 while draining, with a dead engine, or with the waiting queue full."""
        if self.draining:
            raise RequestError("The server is shutting down.", 503)
        if self.engine.dead_reason is not None:
            raise RequestError(f"The engine is not running: {self.engine.dead_reason}.", 503)
        limit = self.args.max_queue_len
        if limit is not None and num_new and self.engine.num_waiting(num_new) > limit:
            raise RequestError(
                f"The server is overloaded: more than {limit} requests would wait. Retry later.",
                503,
                headers={"Retry-After": "1"},
            )

    def sampling_params(
        self, req: CompletionRequest | ChatCompletionRequest, prompt_len: int
    ) -> SamplingParams:
        e = self.engine
        return sampling_params(
            req, prompt_len, e.max_model_len, e.vocab_size, self.args.max_logprobs
        )


def json_response(
    obj: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(msgspec.json.encode(obj), status, headers, media_type="application/json")


def error_response(err: RequestError) -> Response:
    return json_response(err.body(), err.status, err.headers)


def failed_status(e: Exception) -> int:
    """The HTTP status of a request the engine failed: a 500, but for the request's own
    grammar (too slow to compile), the client's to fix: a 400, so that clients do not retry
    it as they retry a 5xx."""
    if isinstance(e, RequestFailedError) and GRAMMAR_ERROR_MARK in str(e):
        return 400
    return 500


Handler = Callable[[Request, ServerState], Awaitable[Response]]


def endpoint(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A route: RequestError becomes its OpenAI-shaped error; anything else a logged 500."""

    @functools.wraps(fn)
    async def handler(request: Request) -> Response:
        try:
            return await fn(request, request.app.state.server)
        except RequestError as e:
            return error_response(e)
        except FAILED as e:
            return error_response(RequestError(str(e), failed_status(e)))
        except Exception as e:
            logger.exception("internal error in %s", request.url.path)
            return error_response(
                RequestError(f"Internal server error: {type(e).__name__}: {e}", 500)
            )

    return handler
