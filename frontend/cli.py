"""Command line of `python -m frontend`: vLLM's flag names, parsed into EngineConfig + ServerArgs."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from engine_core.config import EngineConfig
from engine_core.protocol import MAX_LOGPROBS

_MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class ServerArgs:
    """What the HTTP server needs beyond the engine's configuration."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # None: the model's name
    max_queue_len: int | None = None  # None: no limit on waiting requests
    max_request_body_bytes: int = 4 * _MiB
    drain_timeout: float = 30.0  # SIGTERM: seconds to let in-flight requests finish
    log_requests: bool = True
    log_level: str = "info"
    max_logprobs: int = MAX_LOGPROBS
    enable_auto_tool_choice: bool = False  # tool_choice "auto" (needs tool_call_parser)
    tool_call_parser: str | None = None  # a name in frontend.tool_parsers.PARSERS

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}.")
        if self.max_queue_len is not None and self.max_queue_len < 0:
            raise ValueError(f"max_queue_len must be non-negative, got {self.max_queue_len}.")
        if self.max_request_body_bytes < 1024:
            raise ValueError(
                f"max_request_body_bytes must be at least 1024, got {self.max_request_body_bytes}."
            )
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be non-negative, got {self.drain_timeout}.")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(
                f"max_logprobs must be in [0, {MAX_LOGPROBS}], got {self.max_logprobs}."
            )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser.")
        if self.tool_call_parser is not None:
            from frontend.tool_parsers import get_parser

            get_parser(self.tool_call_parser)  # an unknown name is an error now, not later
        if self.api_key == "":
            raise ValueError("api_key must not be empty (leave it out to disable authentication).")


def make_parser() -> argparse.ArgumentParser:
    """The argument parser; flag names follow `vllm serve` so scripts carry over."""
    p = argparse.ArgumentParser(
        prog="python -m frontend",
        description="ringserve: an OpenAI-compatible server in front of one EngineCore process.",
    )
    s = p.add_argument_group("server")
    s.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    s.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: %(default)s)"
    )
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    s.add_argument(
        "--served-model-name", default=None, help="model name in the API (default: the model's)"
    )
    s.add_argument(
        "--max-queue-len",
        type=int,
        default=None,
        help="answer 503 while this many requests wait in the scheduler (default: no limit)",
    )
    s.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=4 * _MiB,
        help="answer 413 for a request body over this size (default: %(default)s)",
    )
    s.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let in-flight requests finish before aborting them",
    )
    s.add_argument(
        "--max-logprobs",
        type=int,
        default=MAX_LOGPROBS,
        help="the most logprobs a request may ask for (default: %(default)s)",
    )
    s.add_argument(
        "--disable-log-requests", action="store_true", help="no access-log line per request"
    )
    s.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"]
    )

    t = p.add_argument_group("structured outputs and tools")
    t.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='allow tool_choice "auto": the model decides, --tool-call-parser reads its calls',
    )
    t.add_argument(
        "--tool-call-parser",
        default=None,
        help="how to read tool calls out of the model's text: hermes, llama3_json",
    )
    t.add_argument(
        "--structured-outputs-compile-timeout",
        type=float,
        default=None,
        help="seconds a grammar may take to compile before its request fails (default: 10)",
    )

    e = p.add_argument_group("engine")
    e.add_argument(
        "--model",
        default=None,
        help="a .gguf file or a Hugging Face directory (default: SmolLM2-135M-Instruct)",
    )
    e.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    e.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto (default): the checkpoint's dtype, computed in fp32 on a CPU (exact). "
        "bfloat16 on a CPU with AVX512-BF16 or AMX: a quantized model's steps of 13 rows or "
        "more (9 on AMD CPUs, 6 on AMX tiles) multiply in bf16 (twice the fp32 rate or more) "
        "over a bf16 KV cache",
    )
    e.add_argument(
        "--quantization",
        "-q",
        default=None,
        choices=["none", "int8", "int4", "awq", "gptq", "gguf"],
        help="weight-only quantization at load (RTN: int8 = Q8_0, int4 = Q4_1 blocks of 32); "
        "none: dequantize a quantized checkpoint; awq/gptq/gguf: the checkpoint's own, checked "
        "(default: keep a checkpoint's own quantization)",
    )
    e.add_argument("--tensor-parallel-size", "-tp", type=int, default=None)
    e.add_argument("--max-num-seqs", type=int, default=None)
    e.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens one engine step may run (default 1024 for a server on a CPU, 2048 otherwise)",
    )
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--block-size", type=int, default=None)
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    e.add_argument("--num-gpu-blocks-override", type=int, default=None)
    e.add_argument("--long-prefill-token-threshold", type=int, default=None)
    e.add_argument(
        "--kv-cache-space-gib", type=float, default=None, help="CPU: GiB for the KV cache"
    )
    e.add_argument("--gpu-memory-utilization", type=float, default=None)
    e.add_argument("--enforce-eager", action="store_true", default=None)
    e.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    e.add_argument("--load-format", default=None, choices=["auto", "dummy"])
    e.add_argument("--hf-config", default=None, help="with --load-format dummy: a config.json")
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--num-threads", type=int, default=None, help="torch threads in the engine core")
    e.add_argument(
        "--speculative-config",
        type=_json_object,
        default=None,
        help='speculative decoding, as JSON: \'{"method": "ngram", "num_speculative_tokens": 3}\'',
    )
    return p


_ENGINE_FLAGS = (
    "model",
    "tokenizer",
    "dtype",
    "quantization",
    "tensor_parallel_size",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "block_size",
    "enable_prefix_caching",
    "num_gpu_blocks_override",
    "long_prefill_token_threshold",
    "kv_cache_space_gib",
    "gpu_memory_utilization",
    "enforce_eager",
    "device",
    "load_format",
    "hf_config",
    "seed",
    "num_threads",
    "structured_outputs_compile_timeout",
    "speculative_config",
)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> tuple[EngineConfig, ServerArgs]:
    """Parse the command line; a bad value exits with a usage error that names it."""
    parser = make_parser()
    ns = parser.parse_args(argv)
    # Flags left out keep EngineConfig's defaults, so that there is one place for them.
    engine_kwargs = {k: getattr(ns, k) for k in _ENGINE_FLAGS if getattr(ns, k) is not None}
    try:
        config = EngineConfig(usage_context="server", **engine_kwargs)
        server = ServerArgs(
            host=ns.host,
            port=ns.port,
            api_key=ns.api_key,
            served_model_name=ns.served_model_name,
            max_queue_len=ns.max_queue_len,
            max_request_body_bytes=ns.max_request_body_bytes,
            drain_timeout=ns.drain_timeout,
            log_requests=not ns.disable_log_requests,
            log_level=ns.log_level,
            max_logprobs=ns.max_logprobs,
            enable_auto_tool_choice=ns.enable_auto_tool_choice,
            tool_call_parser=ns.tool_call_parser,
        )
    except ValueError as e:
        parser.error(str(e))
    return config, server
