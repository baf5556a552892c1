"""Grammar compiles in a child process, so that one over its time limit is killed, not left
running (xgrammar has no way to cancel a compile, and a thread cannot be stopped).

`python -m engine_core.structured_output.compile_process` reads, on stdin, the vocabulary
(xgrammar's TokenizerInfo as JSON) once, then one spec at a time (StructuredOutputsParams as
JSON), and answers each on stdout with the CompiledGrammar as xgrammar's JSON, or the error.
Frames are a 4-byte length then msgpack (msgspec); nothing is pickled. The EngineCore side
(`CompileProcess`) starts one child per compile thread, on first use; a compile that runs
past its limit kills the child, and the thread's next compile starts a fresh one.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import sys
import time

import msgspec

from engine_core.protocol import StructuredOutputsParams

_HEADER = struct.Struct("<I")
_START_TIMEOUT_S = 300.0  # a loaded machine imports xgrammar (and torch) slowly


class CompileTimeout(Exception):
    """A compile ran past its time limit; its process was killed."""


class _Reply(msgspec.Struct, array_like=True, omit_defaults=True):
    compiled_json: str = ""
    error: str | None = None


class CompileProcess:
    """One child that compiles specs, one at a time, against one vocabulary."""

    def __init__(self, tokenizer_info_json: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine_core.structured_output.compile_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in, self._out = self.proc.stdin, self.proc.stdout.fileno()
        self._send(tokenizer_info_json.encode())
        # Ready once it has imported xgrammar and read the vocabulary: untimed by the limit.
        if self._recv(time.monotonic() + _START_TIMEOUT_S) is None:
            self.kill()
            raise RuntimeError(
                f"the grammar compile process did not start within {_START_TIMEOUT_S:g} s"
            )

    def compile(self, params: StructuredOutputsParams, timeout: float) -> str:
        """The spec's CompiledGrammar as JSON. ValueError: it does not compile; CompileTimeout:
        not within `timeout` seconds (the child is killed); RuntimeError: the child died."""
        self._send(msgspec.json.encode(params))
        frame = self._recv(time.monotonic() + timeout)
        if frame is None:
            self.kill()
            raise CompileTimeout(f"no compiled grammar within {timeout:g} s")
        reply = msgspec.msgpack.decode(frame, type=_Reply)
        if reply.error is not None:
            raise ValueError(reply.error)
        return reply.compiled_json

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._in.close()
        self.proc.stdout.close()  # type: ignore[union-attr]

    def _send(self, payload: bytes) -> None:
        try:
            self._in.write(_HEADER.pack(len(payload)) + payload)
            self._in.flush()
        except (BrokenPipeError, ValueError):
            raise RuntimeError(self._died()) from None

    def _recv(self, deadline: float) -> bytes | None:
        """One frame, or None once the deadline passes."""
        header = self._read(_HEADER.size, deadline)
        if header is None:
            return None
        return self._read(_HEADER.unpack(header)[0], deadline)

    def _read(self, n: int, deadline: float) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out], [], [], left)[0]:
                return None
            chunk = os.read(self._out, n - got)
            if not chunk:
                raise RuntimeError(self._died())
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _died(self) -> str:
        code = self.proc.wait()
        return f"the grammar compile process exited (code {code})"


# ---------------------------------------------------------------- the child


def _read_frame(stream) -> bytes | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None  # the EngineCore closed the pipe: exit
    (n,) = _HEADER.unpack(header)
    return stream.read(n)


def main() -> int:
    from engine_core.process import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)  # a compile cannot outlive the EngineCore
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the engine, which stops us
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into our frames
    stdin = sys.stdin.buffer
    info_json = _read_frame(stdin)
    if info_json is None:
        return 0
    import xgrammar as xgr

    from engine_core.structured_output.grammar import compile_spec

    info = xgr.TokenizerInfo.deserialize_json(info_json.decode())
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    _write_frame(out, msgspec.msgpack.encode(_Reply()))  # ready
    while (frame := _read_frame(stdin)) is not None:
        params = msgspec.json.decode(frame, type=StructuredOutputsParams)
        try:
            reply = _Reply(compiled_json=compile_spec(compiler, params).serialize_json())
        except Exception as e:
            reply = _Reply(error=str(e))
        _write_frame(out, msgspec.msgpack.encode(reply))
    return 0


def _write_frame(out, payload: bytes) -> None:
    out.write(_HEADER.pack(len(payload)) + payload)
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
