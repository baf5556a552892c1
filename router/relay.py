"""The client's side of a streamed request: the backends' events merged into one stream, and
on a backend's failure mid-stream, a continuation per unfinished choice on another backend
(tries and backoff as for a new request), spliced in."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from router.backends import Backend
from router.circuit import backoff_delays
from router.routing import RouteInfo
from router.stream import _DONE, Choice, Part, StreamState, can_failover, sse

if TYPE_CHECKING:
    from router.proxy import Proxy

logger = logging.getLogger("ringserve.router")


@dataclass(eq=False)
class Upstream:
    """One backend stream feeding the client's: the original request or a continuation."""

    backend: Backend
    resp: httpx.Response
    events: AsyncIterator[str]
    t0: float
    part: Part
    task: asyncio.Task | None = None
    released: bool = False


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for x in rest:
        yield x


async def events_of(resp: httpx.Response) -> AsyncIterator[str]:
    async for line in resp.aiter_lines():
        if line.startswith("data:"):
            yield line[5:].strip()


class Relay:
    """One streamed request's relay: its upstreams, read concurrently into one queue."""

    def __init__(
        self, proxy: Proxy, path: str, fwd: dict, info: RouteInfo, state: StreamState
    ) -> None:
        self.proxy, self.path, self.fwd, self.info, self.state = proxy, path, fwd, info, state
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=64)  # backpressure from the client
        self.active: list[Upstream] = []
        self.failed: set[str] = set()

    def _start(self, up: Upstream) -> None:
        self.active.append(up)
        up.task = asyncio.create_task(self._read(up))

    async def _read(self, up: Upstream) -> None:
        """Put (up, obj) per event, then (up, None) at [DONE] or (up, reason) on a failure."""
        try:
            async for data in up.events:
                if data == "[DONE]":
                    await self.queue.put((up, None))
                    return
                try:
                    obj = json.loads(data)
                except ValueError:
                    await self.queue.put((up, f"not JSON: {data[:80]!r}"))
                    return
                if isinstance(obj, dict) and "error" in obj and not obj.get("choices"):
                    await self.queue.put((up, f"error event: {obj['error']}"))
                    return
                await self.queue.put((up, obj))
            await self.queue.put((up, "the stream ended before [DONE]"))
        except httpx.HTTPError as e:
            await self.queue.put((up, f"{type(e).__name__}: {e}"))

    def _release(self, up: Upstream, ok: bool) -> None:
        if not up.released:
            up.released = True
            self.proxy._done(up.backend, ok, up.t0)

    async def run(
        self,
        b: Backend,
        resp: httpx.Response,
        events: AsyncIterator[str],
        first: str,
        t0: float,
    ) -> AsyncIterator[bytes]:
        """The client's stream: `first` and the rest of `events` (from `resp`), and on a
        failure, the continuations'."""
        st, proxy = self.state, self.proxy
        self._start(Upstream(b, resp, _prepend(first, events), t0, Part()))
        failovers = 0
        try:
            while self.active:
                up, item = await self.queue.get()
                if isinstance(item, dict):
                    out = st.absorb(item, up.part)
                    if out is not None:
                        yield out
                    continue
                self.active.remove(up)
                await up.resp.aclose()
                if item is None:
                    proxy.pool.mark_success(up.backend)
                    self._release(up, True)
                    continue
                logger.warning("stream from %s broke: %s", up.backend.url, item)
                proxy.pool.mark_failure(up.backend, True)
                self._release(up, False)
                self.failed.add(up.backend.url)
                todo = []
                for ch in st.covered(up.part):
                    left = st.remaining_tokens(ch)
                    if ch.finished:
                        continue
                    if left is not None and left <= 0:
                        yield st.final_chunk(ch)
                    else:
                        todo.append(ch)
                if not todo:
                    continue
                if failovers >= proxy.config.max_failovers or not can_failover(st.body):
                    yield sse(_error("The backend failed mid-stream."))
                    yield _DONE
                    return
                failovers += 1
                proxy.metrics.failovers.inc()
                for ch in todo:
                    new = await self._continue(ch)
                    if new is None:
                        yield sse(_error("No backend could continue the stream."))
                        yield _DONE
                        return
                    self._start(new)
            if self.failed and st.wants_usage():  # the broken stream's usage never came
                await self._count_prompts()
                yield st.usage_chunk()
            yield _DONE
        finally:  # done, or the client left: close what is open (the backends abort)
            for up in self.active:
                if up.task is not None:
                    up.task.cancel()
            for up in self.active:
                if up.task is not None:
                    await asyncio.gather(up.task, return_exceptions=True)
                await up.resp.aclose()
                self._release(up, True)

    async def _continue(self, ch: Choice) -> Upstream | None:
        """Open the continuation of one choice on another backend."""
        proxy = self.proxy
        config = proxy.config
        exclude = set(self.failed)
        delays = backoff_delays(config.max_tries, config.backoff_base, config.backoff_cap)
        for attempt in range(config.max_tries):
            if attempt:
                proxy.metrics.retries.inc()
                await proxy.sleep(delays[attempt - 1])
            try:
                b = await proxy.acquire(self.info, exclude)
            except Exception:  # RouterError: the queue timed out or is full
                return None
            made = self.state.continuation(ch, exact=b.ringserve)
            if made is None:
                b.circuit.cancel()
                proxy.pool.release(b)
                logger.warning("choice %d cannot be continued on %s", ch.index, b.url)
                return None
            body, part = made
            t0 = time.monotonic()
            try:
                resp = await proxy._open(b, self.path, self.fwd, json.dumps(body).encode())
                if resp.status_code != 200:
                    await resp.aread()
                    await resp.aclose()
                    raise httpx.HTTPStatusError("", request=resp.request, response=resp)
            except httpx.HTTPError as e:
                logger.warning("continuation on %s failed: %s", b.url, e)
                proxy.pool.mark_failure(b, isinstance(e, httpx.ConnectError))
                proxy._done(b, False, t0)
                exclude.add(b.url)
                continue
            logger.info("choice %d continues on %s after %d tokens", ch.index, b.url, ch.count)
            return Upstream(b, resp, events_of(resp), t0, part)
        return None

    async def _count_prompts(self) -> None:
        """Token counts of the prompts no continuation reported, from a backend's /tokenize
        (ours and vLLM's); one that cannot be had counts 0 (and is logged)."""
        st = self.state
        for i in st.unknown_prompts():
            n = 0
            for b in self.proxy.pool.available(self.failed):
                try:
                    r = await self.proxy.client.post(
                        b.url + "/tokenize", json=st.tokenize_body(i), headers=self.fwd, timeout=10
                    )
                    n = int(r.json()["count"])
                    break
                except (httpx.HTTPError, ValueError, KeyError, TypeError):
                    continue
            else:
                logger.warning("no backend counted prompt %d's tokens for the usage", i)
            st.prompt_tokens[i] = n


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": 502}}
